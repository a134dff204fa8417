"""Triton ops of the SSM step: checkpointing replay (the product), the two baselines, and materialize
(fold slots' histories into fresh checkpoints)."""
from specssm.ops.baselines import all_states_ssu, always_write_ssu
from specssm.step import checkpointing_ssu, materialize

__all__ = ["checkpointing_ssu", "always_write_ssu", "all_states_ssu", "materialize"]
