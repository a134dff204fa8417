"""The checkpointing step family: the coefficient kernel, the write / no-write mains, the fused single
launch, their launcher and tuning tables (README.md in this folder: the contract)."""
from specssm.step.launch import checkpointing_ssu, reads_plan
from specssm.step.materialize import materialize

__all__ = ["checkpointing_ssu", "reads_plan", "materialize"]
