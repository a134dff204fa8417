"""Float64 PyTorch references: the specification every kernel is tested against.

The shared math (the recurrence, state storage) lives here; the step family's references (the three
strategies' steps and materialize) live beside its kernels, in specssm/step/reference.py, and are
re-exported here on first use (so importing the recurrence does not import the Triton kernels)."""
from specssm.reference.recurrence import fold, gate, outputs_rectangle, outputs_triangle, process_dt, sequential
from specssm.reference.storage import decode_state, encode_state, is_quantized

_STEP_REFERENCES = ("all_states_ssu_ref", "always_write_ssu_ref", "checkpointing_ssu_ref", "materialize_ref",
                    "fold_slot")

__all__ = [
    "fold", "gate", "outputs_rectangle", "outputs_triangle", "process_dt", "sequential",
    "decode_state", "encode_state", "is_quantized", *_STEP_REFERENCES,
]


def __getattr__(name):
    if name in _STEP_REFERENCES:
        from specssm.step import reference
        return getattr(reference, name)
    raise AttributeError(f"module 'specssm.reference' has no attribute {name!r}")
