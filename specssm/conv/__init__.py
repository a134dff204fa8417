"""Mamba2 conv1d decode update under speculative decoding (rollback by offset, no state copies)."""

from .conv1d import conv1d_update
from .state import conv_commit, conv_state_from_prefill, new_conv_offset, new_conv_state

__all__ = ["conv1d_update", "conv_commit", "conv_state_from_prefill", "new_conv_offset", "new_conv_state"]
