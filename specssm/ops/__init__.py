"""Triton ops of the SSM step: checkpointing replay (the product), the two baselines, and materialize
(fold slots' histories into fresh checkpoints)."""
from specssm.step import checkpointing_ssu, materialize
from specssm.ops.baselines import always_write_ssu, all_states_ssu

__all__ = ["checkpointing_ssu", "always_write_ssu", "all_states_ssu", "materialize"]
