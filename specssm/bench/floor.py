"""Bytes a step must move (benchmarks/README.md, "What is measured": floor), per strategy, as pure
functions of the sizes.

The floor of a step is `bytes / copy bandwidth`, the time a perfect kernel would take if it did nothing but
stream its unavoidable reads and writes at the speed of a large device-to-device copy. Counted per row
(one layer):

checkpointing (window W) and always-write (W = 0), row with history length K:
    state read        H·P·N·s              (+ scales H·P·4 for int8 / fp8 states)
    state write       H·P·N·s  if K + T > W (the row flushes)   (+ scales H·P·4)
    history reads     K·(H·P + G·N)·a + 4·H·K                    (x, B in the activation dtype, dt fp32)
    new inputs        T·(H·P + 2·G·N + H)·a  (+ T·H·P·a for z)  (x, B, C, dt)
    outputs           T·H·P·a
    ring appends      T·(H·P + G·N)·a + 4·H·T
all-states:
    state read H·P·N·s, state writes T·H·P·N·s, new inputs, outputs (no history, no ring).
conv1d (the figure with the conv), conv_dim = H·P + 2·G·N, per row:
    context read (d_conv-1)·conv_dim·a, new inputs T·conv_dim·a, outputs T·conv_dim·a,
    state store (d_conv-1+T)·conv_dim·a; once per step the weights d_conv·conv_dim·a and bias conv_dim·a.

`s` = state element size, `a` = activation element size. Per-head parameters (A, D, dt_bias), slot ids,
ring_start, pnat and seeds are a few bytes per row or per step and are left out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from specssm.bench import strategies

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1, "fp64": 8}
QUANTIZED = ("int8", "fp8")


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {name!r}")
    return DTYPE_BYTES[name]


@dataclass
class StepBytes:
    """Bytes of one step (all rows of one layer), by component."""
    state_read: int = 0
    state_write: int = 0
    scale_read: int = 0
    scale_write: int = 0
    history: int = 0
    inputs: int = 0
    outputs: int = 0
    ring_appends: int = 0
    conv: int = 0
    rows: int = 0
    writes: int = 0

    @property
    def total(self) -> int:
        return (self.state_read + self.state_write + self.scale_read + self.scale_write + self.history
                + self.inputs + self.outputs + self.ring_appends + self.conv)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d


def ssu_step_bytes(strategy: str, *, H: int, P: int, N: int, G: int, T: int, pnat, state_dtype: str,
                   act_dtype: str = "bf16", window: int = 16, has_z: bool = False) -> StepBytes:
    """Bytes one step of `strategy` must move for rows whose history lengths are `pnat` (one entry per
    live row; ignored by all-states except for its length). always-write uses window 0."""
    st = strategies.get(strategy)
    s, a = dtype_bytes(state_dtype), dtype_bytes(act_dtype)
    ks = [int(k) for k in pnat]
    rows = len(ks)
    state = H * P * N * s
    scale = H * P * 4 if state_dtype in QUANTIZED else 0
    per_row_inputs = T * (H * P + 2 * G * N + H) * a + (T * H * P * a if has_z else 0)
    b = StepBytes(rows=rows)
    b.inputs = rows * per_row_inputs
    b.outputs = rows * T * H * P * a
    b.state_read = rows * state
    if not st.ring:
        if scale:
            raise ValueError(f"state_dtype: all_states keeps float states only, got {state_dtype!r}")
        b.state_write = rows * T * state
        b.writes = rows
        return b
    W = window if st.window else 0
    b.scale_read = rows * scale
    b.writes = sum(1 for k in ks if k + T > W)
    b.state_write = b.writes * state
    b.scale_write = b.writes * scale
    b.history = sum(k * ((H * P + G * N) * a + 4 * H) for k in ks)
    b.ring_appends = rows * T * ((H * P + G * N) * a + 4 * H)
    return b


def conv_step_bytes(*, H: int, P: int, N: int, G: int, T: int, rows: int, act_dtype: str = "bf16",
                    d_conv: int = 4, has_bias: bool = True) -> int:
    """Bytes of the conv1d update of one step (rows live rows, one layer)."""
    a = dtype_bytes(act_dtype)
    conv_dim = H * P + 2 * G * N
    per_row = ((d_conv - 1) + T + T + (d_conv - 1 + T)) * conv_dim * a
    per_step = d_conv * conv_dim * a + (conv_dim * a if has_bias else 0)
    return rows * per_row + per_step


def floor_us(nbytes: float, bandwidth_bytes_per_s: float) -> float:
    """Time in microseconds to move nbytes at the given bandwidth."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth_bytes_per_s: expected > 0, got {bandwidth_bytes_per_s}")
    return nbytes / bandwidth_bytes_per_s * 1e6


def state_bytes_per_slot(strategy: str, *, H: int, P: int, N: int, G: int, T: int, L: int,
                         state_dtype: str, act_dtype: str = "bf16") -> int:
    """Memory one slot of one layer occupies (state, scales, rings): sizes the rotating slot sets."""
    s, a = dtype_bytes(state_dtype), dtype_bytes(act_dtype)
    if not strategies.get(strategy).ring:
        return T * H * P * N * s
    scale = H * P * 4 if state_dtype in QUANTIZED else 0
    return H * P * N * s + scale + (H * L * P + G * L * N) * a + 4 * H * L


def touched_bytes_per_row(strategy: str, *, H: int, P: int, N: int, T: int, state_dtype: str) -> int:
    """State bytes a step touches per row (what must not stay in L2 between replays)."""
    s = dtype_bytes(state_dtype)
    if not strategies.get(strategy).ring:
        return (1 + T) * H * P * N * s
    return H * P * N * s + (H * P * 4 if state_dtype in QUANTIZED else 0)
