"""Input validation shared by the references and the kernels.

Every error names the argument, what it got and what was expected, and is raised before anything is
written, so a rejected call leaves every cache untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specssm._runtime import interpreting, kernels_interpreted

FLOAT_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                torch.float8_e4m3fn, torch.int16)
QUANT_STATE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.int16)
MAX_WINDOW = 16


def _shape(t) -> tuple:
    return tuple(t.shape)


def same_device(a, b) -> bool:
    """'cuda' and 'cuda:0' name the same device when the current device is 0."""
    if a == b:          # the common case (tensors on one device), without building device objects
        return True
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        cur = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return a.index == b.index


def check_tensor(name: str, t, *, shape=None, dtype=None, dtypes=None, device=None, ndim=None, why=""):
    """Check one tensor argument. `shape` may hold None for free dimensions; `why` says where the
    expected sizes come from (e.g. "slots of state, H and P of x"), so that a message blaming `name`
    for a size it shares with another tensor shows which one set it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {_shape(t)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(e is None or e == g for e, g in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
            src = f" ({why})" if why else ""
            raise ValueError(f"{name}: expected shape {want}{src}, got {_shape(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t


def check_inner_contiguous(name: str, t: torch.Tensor, dims: int):
    """The last `dims` dimensions must be packed (row-major); the leading ones may be strided."""
    expected = 1
    for d in range(t.dim() - 1, t.dim() - 1 - dims, -1):
        if t.shape[d] > 1 and t.stride(d) != expected:
            raise ValueError(f"{name}: expected the last {dims} dimensions packed (row-major), got "
                             f"strides {tuple(t.stride())} for shape {_shape(t)}")
        expected *= t.shape[d]
    return t


def tied_per_head(name: str, t, H: int, P: int, N: int | None = None, device=None):
    """A per-head parameter passed either compact `(H,)` or as the mamba convention's stride-0
    expanded view `(H, P)` / `(H, P, N)`. Returns the compact `(H,)` view (no copy)."""
    if t is None:
        return None
    check_tensor(name, t, device=device)
    if t.dim() == 1:
        check_tensor(name, t, shape=(H,))
        return t
    full = (H, P) if N is None else (H, P, N)
    if _shape(t) != full:
        raise ValueError(f"{name}: expected shape (H,)=({H},) or tied {full}, got {_shape(t)}")
    if any(t.stride(d) != 0 for d in range(1, t.dim()) if t.shape[d] > 1):
        raise ValueError(f"{name}: expected tied over head_dim/d_state (stride 0 in dims 1..), got "
                         f"strides {tuple(t.stride())}; pass a (H,) tensor or an expand()ed view")
    return t[(slice(None),) + (0,) * (t.dim() - 1)]


def tied_dt(dt, lead: tuple, H: int, P: int, device=None):
    """dt passed as `lead + (H,)` or tied `lead + (H, P)` with stride(-1) == 0. Returns `lead + (H,)`."""
    check_tensor("dt", dt, device=device)
    if _shape(dt) == lead + (H,):
        return dt
    if _shape(dt) != lead + (H, P):
        raise ValueError(f"dt: expected shape {lead + (H,)} or tied {lead + (H, P)}, got {_shape(dt)}")
    if P > 1 and dt.stride(-1) != 0:
        raise ValueError(f"dt: expected tied over head_dim (stride(-1) == 0), got strides "
                         f"{tuple(dt.stride())}; pass dt[..., None].expand(..., P) or a (..., H) tensor")
    return dt[..., 0]


def agreed_size(what: str, sizes: dict) -> int:
    """A size several tensors must share (the slot count, the ring length), as `{name: size}`.

    Returns the size; when they differ, blames the tensor that differs from the others (the odd one
    out of a majority, else the first that differs from the first one named), so that one wrong tensor
    is not reported as its neighbour's mistake."""
    values = list(sizes.values())
    common = max(values, key=values.count)
    n = values.count(common)
    if n == len(values):
        return common
    if n == 1 or sum(values.count(v) == n for v in set(values)) > 1:
        common = values[0]                         # no majority: the first named sets the size
    keep = [k for k, v in sizes.items() if v == common]
    odd = next(k for k, v in sizes.items() if v != common)
    got = ", ".join(f"{k} {v}" for k, v in sizes.items())
    raise ValueError(f"{odd}: expected {what} {common} (that of {' and '.join(keep)}), got {sizes[odd]} "
                     f"({what}: {got})")


def check_slots_host(name: str, slots: torch.Tensor, num_slots: int, pad_slot_id: int):
    """Range check of slot indices. Done on the host: free for CPU tensors, one sync for GPU ones."""
    s = slots.detach().to("cpu", torch.int64)
    bad = (s != pad_slot_id) & ((s < 0) | (s >= num_slots))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected slot ids in [0, {num_slots}) or pad_slot_id={pad_slot_id}, "
                         f"got {int(s[i])} at row {i}")
    live = s[s != pad_slot_id]
    if live.numel() != torch.unique(live).numel():
        raise ValueError(f"{name}: expected each slot at most once per step, got duplicates in {s.tolist()}")


def check_ring_values_host(ring_start, pnat, state_batch_indices, batch, pad_slot_id, W, T, L,
                           names=("ring_start", "prev_num_accepted_tokens")):
    """Range check of the per-slot ring position of the step's live rows, on the host (free for CPU
    tensors, one sync for GPU ones): pnat in [0, max(W, T)] (a flush leaves pnat = accepted <= T, which
    exceeds W when W < T) and ring_start in [0, L). Other slots (free, not in this step) may hold
    anything. state_batch_indices None: row b uses slot b."""
    if state_batch_indices is None:
        slots = torch.arange(batch, dtype=torch.int64)
    else:
        slots = state_batch_indices.detach().to("cpu", torch.int64)
    rows = (slots != pad_slot_id).nonzero().flatten()
    live = slots[rows]
    cap = max(W, T)
    for name, values, lo, hi, rng in (
            (names[1], pnat, 0, cap, f"[0, {cap}] (max(window={W}, T={T}))"),
            (names[0], ring_start, 0, L - 1, f"[0, {L}) (the ring length)")):
        v = values.detach().to("cpu", torch.int64)[live]
        bad = (v < lo) | (v > hi)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: expected values in {rng} for the slots of live rows, got {int(v[i])} "
                             f"for slot {int(live[i])} (row {int(rows[i])})")


@dataclass(frozen=True)
class SSUShapes:
    """Sizes of one state-update call, derived and checked from its arguments."""
    batch: int          # rows
    T: int              # max new tokens per row
    H: int
    P: int
    N: int
    G: int
    L: int              # ring length
    W: int              # window: a row writes when pnat + len > W
    num_slots: int
    varlen: bool


def check_ssu_args(state, x_cache, B_cache, dt_cache, ring_start, pnat, x, dt, A, B, C, out, D, z,
                   dt_bias, state_batch_indices, pad_slot_id, state_scale, cu_seqlens, max_seqlen,
                   window, check_slots=True):
    """Validate the arguments of one checkpointing step (the FlashInfer-compatible signature).

    Returns (shapes, A_h, dt_c, D_h, dt_bias_h): the per-head parameters as compact (H,) views and dt
    as (batch, T, H) / (total, H) without copying.
    """
    check_tensor("x", x, dtypes=FLOAT_ACT_DTYPES)
    dev = x.device
    varlen = cu_seqlens is not None
    if varlen:
        check_tensor("x", x, ndim=3)
        total, H, P = x.shape
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
        batch = cu_seqlens.shape[0] - 1
        if batch < 0:
            raise ValueError("cu_seqlens: expected at least one entry, got shape (0,)")
        if max_seqlen is None:
            raise ValueError("max_seqlen: expected an int with cu_seqlens, got None")
        T = int(max_seqlen)
        lead = (total,)
    else:
        check_tensor("x", x, ndim=4)
        batch, T, H, P = x.shape
        lead = (batch, T)
    nd = len(lead) + 2
    check_tensor("state", state, ndim=4, dtypes=STATE_DTYPES, device=dev)
    check_tensor("B", B, ndim=nd, dtypes=FLOAT_ACT_DTYPES, device=dev)
    check_tensor("C", C, ndim=nd, dtype=B.dtype, device=dev)
    check_tensor("x_cache", x_cache, ndim=4, dtype=x.dtype, device=dev)
    check_tensor("B_cache", B_cache, ndim=4, dtype=B.dtype, device=dev)
    # float64 is for float64 reference runs; kernels take float32
    check_tensor("dt_cache", dt_cache, ndim=3, dtypes=(torch.float32, torch.float64), device=dev)
    check_tensor("ring_start", ring_start, ndim=1, dtype=torch.int32, device=dev)
    check_tensor("prev_num_accepted_tokens", pnat, ndim=1, dtype=torch.int32, device=dev)
    # sizes shared by several tensors: the odd one out is blamed, not the one checked after it
    N = agreed_size("d_state (last dim)", {"state": state.shape[3], "B": B.shape[-1], "C": C.shape[-1],
                                           "B_cache": B_cache.shape[3]})
    num_slots = agreed_size("slot count (dim 0)", {
        "state": state.shape[0], "x_cache": x_cache.shape[0], "B_cache": B_cache.shape[0],
        "dt_cache": dt_cache.shape[0], "ring_start": ring_start.shape[0], "prev_num_accepted_tokens": pnat.shape[0]})
    L = agreed_size("ring length (dim 2)", {"x_cache": x_cache.shape[2], "B_cache": B_cache.shape[2],
                                            "dt_cache": dt_cache.shape[2]})
    check_tensor("state", state, shape=(num_slots, H, P, N), why="H and P of x")
    check_inner_contiguous("state", state, 2)
    check_tensor("B", B, shape=lead + (None, N), why="rows/tokens of x")
    G = B.shape[-2]
    if G < 1 or H % G:
        raise ValueError(f"B: expected ngroups dividing nheads={H}, got {G}")
    check_tensor("C", C, shape=lead + (G, N), why="like B")
    check_tensor("x_cache", x_cache, shape=(num_slots, H, L, P), why="H and P of x")
    check_tensor("B_cache", B_cache, shape=(num_slots, G, L, N), why="ngroups of B")
    check_tensor("dt_cache", dt_cache, shape=(num_slots, H, L), why="H of x")
    for nm, t in (("x_cache", x_cache), ("B_cache", B_cache)):
        check_inner_contiguous(nm, t, 2)
    check_tensor("out", out, shape=tuple(x.shape), dtype=x.dtype, device=dev, why="like x")
    if z is not None:
        check_tensor("z", z, shape=tuple(x.shape), dtype=x.dtype, device=dev, why="like x")
    dt_c = tied_dt(dt, lead, H, P, device=dev)
    if dt_c.dtype not in FLOAT_ACT_DTYPES:
        raise TypeError(f"dt: expected a floating dtype, got {dt_c.dtype}")
    A_h = tied_per_head("A", A, H, P, N, device=dev)
    D_h = tied_per_head("D", D, H, P, device=dev)
    dt_bias_h = tied_per_head("dt_bias", dt_bias, H, P, device=dev)
    if state.dtype in QUANT_STATE_DTYPES:
        if state_scale is None:
            raise ValueError(f"state_scale: expected a (slots, {H}, {P}) float32 tensor for "
                             f"{state.dtype} state, got None")
        check_tensor("state_scale", state_scale, shape=(num_slots, H, P), dtype=torch.float32, device=dev,
                     why="slots, H and P of state")
    if T < 1:
        raise ValueError(f"x: expected at least one token per row, got T={T}")
    W = L - T if window is None else int(window)
    if not 0 <= W <= MAX_WINDOW:
        raise ValueError(f"window: expected 0 <= W <= {MAX_WINDOW} (W = x_cache ring length {L} - T {T} "
                         f"when not given), got {W}")
    # pnat <= max(W, T) after any commit; its reads and the T appends must fit the ring disjointly.
    if max(W, T) + T > L:
        raise ValueError(f"x: expected max(window, T) + T <= the ring length {L} of x_cache, B_cache and "
                         f"dt_cache (window={W}), got T={T}")
    check_slot_rows(state_batch_indices, batch, num_slots, pad_slot_id, dev, check_slots)
    if check_slots:
        check_ring_values_host(ring_start, pnat, state_batch_indices, batch, pad_slot_id, W, T, L)
    if varlen and check_slots:
        cs = cu_seqlens.detach().cpu().to(torch.int64)
        lens = cs[1:] - cs[:-1]
        if int(cs[0]) != 0 or int(cs[-1]) != lead[0] or bool((lens < 0).any()) or bool((lens > T).any()):
            raise ValueError(f"cu_seqlens: expected 0 = c[0] <= ... <= c[-1] = {lead[0]} tokens with each "
                             f"row's length in [0, max_seqlen={T}], got {cs.tolist()}")
    return (SSUShapes(batch, T, H, P, N, G, L, W, num_slots, varlen), A_h, dt_c, D_h, dt_bias_h)


# all-states keeps float states only (float64 for reference runs)
ALL_STATES_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_slot_rows(state_batch_indices, batch, num_slots, pad_slot_id, device, check_slots=True):
    """state_batch_indices: `(batch,)` int32/int64 slot ids (or None: row b uses slot b)."""
    if state_batch_indices is not None:
        check_tensor("state_batch_indices", state_batch_indices, shape=(batch,),
                     dtypes=(torch.int32, torch.int64), device=device, why="one slot per row of x")
        if check_slots:
            check_slots_host("state_batch_indices", state_batch_indices, num_slots, pad_slot_id)
    elif batch > num_slots:
        raise ValueError(f"x: expected batch <= slots ({num_slots}) without state_batch_indices, got {batch}")


def check_all_states_args(states, state_index, x, dt, A, B, C, out, D, z, dt_bias, state_batch_indices,
                          pad_slot_id, check_slots=True):
    """Validate the arguments of one all-states step. Returns (N, G, dt_c, A_h, D_h, dt_bias_h), the
    per-head parameters as compact (H,) views and dt as (batch, T, H), without copying."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_ACT_DTYPES)
    batch, T, H, P = x.shape
    dev = x.device
    check_tensor("states", states, ndim=5, dtypes=ALL_STATES_DTYPES, device=dev)
    slots, Ts, Hs, Ps, N = states.shape
    if (Ts, Hs, Ps) != (T, H, P):
        raise ValueError(f"states: expected shape (slots, {T}, {H}, {P}, N) (T, H and P of x), got "
                         f"{tuple(states.shape)}")
    check_tensor("state_index", state_index, shape=(slots,), dtype=torch.int32, device=dev, why="slots of states")
    check_tensor("B", B, shape=(batch, T, None, N), dtypes=FLOAT_ACT_DTYPES, device=dev,
                 why="batch and T of x, N of states")
    G = B.shape[2]
    if G < 1 or H % G:
        raise ValueError(f"B: expected ngroups dividing nheads={H}, got {G}")
    check_tensor("C", C, shape=tuple(B.shape), dtype=B.dtype, device=dev, why="like B")
    check_tensor("out", out, shape=tuple(x.shape), dtype=x.dtype, device=dev, why="like x")
    if z is not None:
        check_tensor("z", z, shape=tuple(x.shape), dtype=x.dtype, device=dev, why="like x")
    dt_c = tied_dt(dt, (batch, T), H, P, device=dev)
    if dt_c.dtype not in FLOAT_ACT_DTYPES:
        raise TypeError(f"dt: expected a floating dtype, got {dt_c.dtype}")
    A_h, D_h = tied_per_head("A", A, H, P, N, device=dev), tied_per_head("D", D, H, P, device=dev)
    bias_h = tied_per_head("dt_bias", dt_bias, H, P, device=dev)
    check_slot_rows(state_batch_indices, batch, slots, pad_slot_id, dev, check_slots)
    return N, G, dt_c, A_h, D_h, bias_h


CPU_FIX = ("set TRITON_INTERPRET=1 in the environment before triton is imported (e.g. `TRITON_INTERPRET=1 "
           "python script.py`), or use a CUDA device; the float64 references (specssm.reference) run anywhere")


def check_triton_device(name: str, device) -> None:
    """The Triton kernels launch on a CUDA device, or on the CPU through the Triton interpreter only;
    without it Triton fails at the launch with "0 active drivers". Raises RuntimeError naming the fix
    before anything is written."""
    device = torch.device(device)
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"{name}: expected a CUDA or CPU tensor for the Triton kernels, got device {device}")
    if kernels_interpreted():
        return
    late = " (it is set now, but was not when the kernels were imported)" if interpreting() else ""
    raise RuntimeError(f"{name}: got a CPU tensor, but the Triton kernels run on the CPU only through the "
                       f"Triton interpreter, which is off{late}. Fix: {CPU_FIX}")


def check_kernel_layout(x, B, C, out, z):
    """What the Triton kernels need beyond the shapes: a device they run on (CUDA, or the CPU under
    the interpreter), unit stride in the last dimension (vector loads) and C laid out like B (one set
    of strides for both)."""
    check_triton_device("x", x.device)
    for name, t in (("x", x), ("B", B), ("C", C), ("out", out), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got strides "
                             f"{tuple(t.stride())}")
    if C.stride() != B.stride():
        raise ValueError(f"C: expected the same strides as B {tuple(B.stride())}, got {tuple(C.stride())}")
