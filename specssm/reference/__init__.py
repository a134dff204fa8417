"""Float64 PyTorch references: the specification every kernel is tested against."""
from specssm.reference.recurrence import (process_dt, sequential, fold, outputs_triangle,
                                          outputs_rectangle, gate)
from specssm.reference.storage import encode_state, decode_state, is_quantized
from specssm.reference.step import checkpointing_ssu_ref, always_write_ssu_ref, all_states_ssu_ref
from specssm.reference.materialize import materialize_ref, fold_slot

__all__ = ["process_dt", "sequential", "fold", "outputs_triangle", "outputs_rectangle", "gate", "encode_state",
           "decode_state", "is_quantized", "checkpointing_ssu_ref", "always_write_ssu_ref", "all_states_ssu_ref",
           "materialize_ref", "fold_slot"]
