"""Float64 PyTorch references: the specification every kernel is tested against."""
from specssm.reference.materialize import fold_slot, materialize_ref
from specssm.reference.recurrence import fold, gate, outputs_rectangle, outputs_triangle, process_dt, sequential
from specssm.reference.step import all_states_ssu_ref, always_write_ssu_ref, checkpointing_ssu_ref
from specssm.reference.storage import decode_state, encode_state, is_quantized

__all__ = [
    "fold", "gate", "outputs_rectangle", "outputs_triangle", "process_dt", "sequential",
    "all_states_ssu_ref", "always_write_ssu_ref", "checkpointing_ssu_ref",
    "decode_state", "encode_state", "is_quantized", "materialize_ref", "fold_slot",
]
