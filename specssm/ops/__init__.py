"""Triton ops of the SSM step: checkpointing replay (the product) and the two baselines."""
from specssm.step import checkpointing_ssu
from specssm.ops.baselines import always_write_ssu, all_states_ssu

__all__ = ["checkpointing_ssu", "always_write_ssu", "all_states_ssu"]
