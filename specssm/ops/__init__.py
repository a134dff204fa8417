"""The SSM step's public Triton ops, in one import: checkpointing replay (the product), the two
baselines, and materialize (fold slots' histories into fresh checkpoints). They live in specssm/step."""
from specssm.step import checkpointing_ssu, materialize
from specssm.step.baselines import all_states_ssu, always_write_ssu

__all__ = ["checkpointing_ssu", "always_write_ssu", "all_states_ssu", "materialize"]
