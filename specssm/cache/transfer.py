"""Moving slot states around: the host-side checks of `materialize` (its pair resolution and folds are
kernels, specssm/step/materialize.py), and `SSMCache.fork`, `export_states`, `import_states`.

A *pair* i takes source slot `src_slots[i]` to destination slot `dst_slots[i]`; a pair whose destination
is `pad_slot_id` is padding (its source is ignored). Destinations of live pairs are distinct and none is
another pair's source, so no pair reads what another one writes (src == dst within one pair is allowed).
"""
from __future__ import annotations

import torch

from specssm._checks import FLOAT_ACT_DTYPES, check_tensor, tied_per_head
from specssm.reference.storage import is_quantized

RING_STRATEGIES = ("checkpointing", "always_write")
INT_DTYPES = (torch.int32, torch.int64)


def check_ring_cache(name: str, cache, what: str) -> None:
    """`what` (an operation) needs an SSMCache of a ring strategy."""
    from specssm.cache.cache import SSMCache
    if not isinstance(cache, SSMCache):
        raise TypeError(f"{name}: expected an SSMCache, got {type(cache).__name__}")
    if cache.strategy not in RING_STRATEGIES:
        raise ValueError(f"{name}: expected a cache of a ring strategy {RING_STRATEGIES} for {what}, got "
                         f"strategy {cache.strategy!r}")


def check_pair_tensors(src_slots, dst_slots, device) -> int:
    """Types, shapes and device of a pair list; returns the number of pairs."""
    check_tensor("src_slots", src_slots, ndim=1, dtypes=INT_DTYPES, device=device)
    check_tensor("dst_slots", dst_slots, shape=tuple(src_slots.shape), dtypes=INT_DTYPES, device=device,
                 why="one destination per source")
    return src_slots.shape[0]


def check_pairs_host(src_slots, dst_slots, num_slots: int, pad_slot_id: int) -> torch.Tensor:
    """Slot ids of the pairs on the host (one sync for GPU tensors): sources of live pairs in [0, num_slots),
    destinations in [0, num_slots) or pad_slot_id, distinct, and none another pair's source. Returns the
    live pairs' indices (CPU int64)."""
    src = src_slots.detach().to("cpu", torch.int64)
    dst = dst_slots.detach().to("cpu", torch.int64)
    live = dst != pad_slot_id
    for name, v in (("dst_slots", dst), ("src_slots", src)):
        bad = live & ((v < 0) | (v >= num_slots))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            pad = " or pad_slot_id" if name == "dst_slots" else ""
            raise ValueError(f"{name}: expected slot ids in [0, {num_slots}){pad}, got {int(v[i])} at pair {i}")
    pairs = live.nonzero().flatten()
    seen = {}
    for i in pairs.tolist():
        d = int(dst[i])
        if d in seen:
            raise ValueError(f"dst_slots: expected distinct destinations, got slot {d} at pairs {seen[d]} and {i}")
        seen[d] = i
    for j in pairs.tolist():
        i = seen.get(int(src[j]))
        if i is not None and i != j:
            raise ValueError(f"dst_slots: expected no pair to write another pair's source, got slot {int(dst[i])} "
                             f"as the destination of pair {i} and the source of pair {j}")
    return pairs


def per_layer_A(A, num_layers: int, H: int, P: int, N: int, device) -> list:
    """A of every layer as compact (H,) views: a sequence of num_layers tensors ((H,) or tied (H, P, N)),
    or one (num_layers, H) tensor."""
    if isinstance(A, torch.Tensor):
        check_tensor("A", A, shape=(num_layers, H), dtypes=FLOAT_ACT_DTYPES, device=device,
                     why="layers and heads of the cache")
        return list(A)
    if not isinstance(A, (list, tuple)) or len(A) != num_layers:
        got = f"{type(A).__name__} of {len(A)}" if isinstance(A, (list, tuple)) else type(A).__name__
        raise ValueError(f"A: expected one per-head A per layer ({num_layers}) or a ({num_layers}, {H}) tensor, "
                         f"got {got}")
    out = []
    for i, a in enumerate(A):
        a_h = tied_per_head(f"A[{i}]", a, H, P, N, device=device)
        if a_h.dtype not in FLOAT_ACT_DTYPES:
            raise TypeError(f"A[{i}]: expected a floating dtype, got {a_h.dtype}")
        out.append(a_h)
    return out


def check_k(k, n: int, device):
    """k: None (each source's pnat), an int, or an (n,) int tensor on the cache's device."""
    if k is None or (isinstance(k, int) and not isinstance(k, bool)):
        return k
    check_tensor("k", k, shape=(n,), dtypes=INT_DTYPES, device=device, why="one per pair")
    return k


def check_materialize_args(cache, src_slots, dst_slots, A, k, rounding) -> tuple:
    """The checks of a materialize call that need no sync (the kernel's launcher and the float64
    reference run the same ones); returns (pairs n, per-layer A, k)."""
    check_ring_cache("cache", cache, "materialize")
    if rounding not in ("rn", "sr"):
        raise ValueError(f"rounding: expected 'rn' or 'sr', got {rounding!r}")
    n = check_pair_tensors(src_slots, dst_slots, cache.device)
    A_layers = per_layer_A(A, cache.num_layers, cache.H, cache.P, cache.N, cache.device)
    return n, A_layers, check_k(k, n, cache.device)


def check_fold_values_host(cache, src_slots, k, pairs) -> None:
    """Host checks of the live pairs' ring position: the source's pnat in [0, max(W, T)], ring_start in
    [0, L), and k in [0, pnat]."""
    cap = max(cache.W, cache.T)
    src = src_slots.detach().to("cpu", torch.int64)[pairs]
    pn = cache.pnat.detach().to("cpu", torch.int64)[src]
    rs = cache.ring_start.detach().to("cpu", torch.int64)[src]
    for name, v, lo, hi in (("cache.pnat", pn, 0, cap), ("cache.ring_start", rs, 0, cache.L - 1)):
        bad = (v < lo) | (v > hi)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: expected values in [{lo}, {hi}] for the source slots, got {int(v[i])} for "
                             f"slot {int(src[i])} (pair {int(pairs[i])})")
    if k is None:
        return
    kv = torch.full_like(pn, k) if isinstance(k, int) else k.detach().to("cpu", torch.int64)[pairs]
    bad = (kv < 0) | (kv > pn)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"k: expected values in [0, pnat of the source slot] (ring tokens to fold), got {int(kv[i])} "
                         f"at pair {int(pairs[i])} (slot {int(src[i])} has pnat {int(pn[i])})")


# ---- fork, export, import (host-driven: between steps, not in CUDA graphs) ------------------------------
def live_pairs(src_slots, dst_slots, pad_slot_id: int, device) -> tuple:
    """(src, dst) int64 on `device` of the pairs whose destination is not padding (host-side; checked
    pairs)."""
    src = src_slots.detach().to("cpu", torch.int64)
    dst = dst_slots.detach().to("cpu", torch.int64)
    live = dst != pad_slot_id
    return src[live].to(device), dst[live].to(device)


def fork(cache, src_slots, dst_slots) -> None:
    """`SSMCache.fork`: every per-slot tensor of the sources copied to the destinations, fresh seeds."""
    from specssm.cache.cache import SSMCache
    if not isinstance(cache, SSMCache):
        raise TypeError(f"cache: expected an SSMCache, got {type(cache).__name__}")
    check_pair_tensors(src_slots, dst_slots, None)
    check_pairs_host(src_slots, dst_slots, cache.num_slots, cache.pad_slot_id)
    src, dst = live_pairs(src_slots, dst_slots, cache.pad_slot_id, cache.device)
    if src.numel() == 0:
        return
    for lc in cache.layers:
        for t in (lc.state, lc.state_scale, lc.x_cache, lc.B_cache, lc.dt_cache):
            if t is not None:
                t[dst] = t[src]
    for t in (cache._ring_start, cache._pnat, cache._state_index):
        t[dst] = t[src]
    cache.fresh_seeds(dst)


def export_keys(cache) -> tuple:
    return ("state", "state_scale") if is_quantized(cache.state_dtype) else ("state",)


def check_slot_list(name: str, slots, num_slots: int) -> torch.Tensor:
    """(n,) distinct slot ids in [0, num_slots), any device; returns them as CPU int64."""
    check_tensor(name, slots, ndim=1, dtypes=INT_DTYPES)
    s = slots.detach().to("cpu", torch.int64)
    bad = (s < 0) | (s >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected slot ids in [0, {num_slots}), got {int(s[i])} at index {i}")
    if s.numel() != torch.unique(s).numel():
        raise ValueError(f"{name}: expected distinct slot ids, got {s.tolist()}")
    return s


def export_states(cache, slots) -> dict:
    """`SSMCache.export_states`: the checkpoints (and row scales) of materialized slots (pnat 0)."""
    check_ring_cache("cache", cache, "export_states")
    s = check_slot_list("slots", slots, cache.num_slots)
    pn = cache.pnat.detach().to("cpu", torch.int64)[s]
    bad = pn != 0
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"slots: expected materialized slots (pnat 0), got slot {int(s[i])} with pnat {int(pn[i])} "
                         f"(unfolded ring tokens; materialize(cache, slots, slots, A) folds them)")
    idx = s.to(cache.device)
    out = {"state": torch.stack([lc.state[idx] for lc in cache.layers])}
    if is_quantized(cache.state_dtype):
        out["state_scale"] = torch.stack([lc.state_scale[idx] for lc in cache.layers])
    return out


def check_import(cache, slots, tensors) -> torch.Tensor:
    """The arguments of `import_states` (nothing written); returns the slots as CPU int64."""
    check_ring_cache("cache", cache, "import_states")
    s = check_slot_list("slots", slots, cache.num_slots)
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors: expected a dict from export_states, got {type(tensors).__name__}")
    want = export_keys(cache)
    if set(tensors) != set(want):
        raise ValueError(f"tensors: expected the keys {list(want)} (a {cache.state_dtype} cache's export), got "
                         f"{sorted(tensors)}")
    n, lead = s.numel(), (cache.num_layers, s.numel(), cache.H, cache.P)
    why = f"layers, {n} slots, H, P of the cache"
    check_tensor("tensors['state']", tensors["state"], shape=lead + (cache.N,), dtype=cache.state_dtype,
                 why=why + ", N")
    if "state_scale" in tensors:
        check_tensor("tensors['state_scale']", tensors["state_scale"], shape=lead, dtype=torch.float32, why=why)
    return s


def import_states(cache, slots, tensors) -> None:
    """`SSMCache.import_states`: the exported checkpoints written to `slots`, fresh (pnat 0, ring_start 0,
    new seeds)."""
    s = check_import(cache, slots, tensors)
    write_imported(cache, s, tensors)


def write_imported(cache, s, tensors) -> None:
    idx = s.to(cache.device)
    for i, lc in enumerate(cache.layers):
        lc.state[idx] = tensors["state"][i].to(cache.device)
        if lc.state_scale is not None:
            lc.state_scale[idx] = tensors["state_scale"][i].to(cache.device)
    cache._pnat[idx] = 0
    cache._ring_start[idx] = 0
    cache.fresh_seeds(idx)
