"""Triton ops of the SSM step: checkpointing replay (the product) and the two baselines."""
from specssm.ops.baselines import all_states_ssu, always_write_ssu
from specssm.step import checkpointing_ssu

__all__ = ["checkpointing_ssu", "always_write_ssu", "all_states_ssu"]
