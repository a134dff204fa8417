"""Loading and storing a state tile in its storage format (device functions of the SSM kernels).

KIND codes: 0 fp32, 1 bf16, 2 fp16 (round to nearest, or stochastic rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

STATE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def load_state_tile(state_ptr, scale_ptr, off, mask, scale_off, p_ok, KIND: tl.constexpr):
    """The (BLOCK_P, BLOCK_N) state tile as fp32."""
    return tl.load(state_ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_state_tile(h, state_ptr, scale_ptr, off, mask, scale_off, p_ok, seed_ptr, slot,
                     KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    """Round the fp32 tile h to the storage format and store it."""
    tl.store(state_ptr + off, h.to(state_ptr.dtype.element_ty), mask=mask)
