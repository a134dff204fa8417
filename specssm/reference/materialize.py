"""Float64 reference of `specssm.step.materialize` (same signature, same effect on the cache), the
specification its kernel is tested against. Loops over pairs in Python: small caches only."""
from __future__ import annotations

import torch

from specssm.cache import transfer
from specssm.reference import recurrence as rec
from specssm.reference.step import store
from specssm.reference.storage import decode_state


def fold_slot(cache, layer: int, slot: int, A_h, k: int) -> torch.Tensor:
    """The checkpoint of `slot` with its first k ring tokens folded in, float64 (H, P, N)."""
    lc = cache.layers[layer]
    rows = [(int(cache.ring_start[slot]) + j) % cache.L for j in range(k)]
    S = decode_state(lc.state[slot], None if lc.state_scale is None else lc.state_scale[slot])
    return rec.fold(S, lc.x_cache[slot][:, rows].transpose(0, 1), lc.dt_cache[slot][:, rows].transpose(0, 1).double(),
                    A_h, lc.B_cache[slot][:, rows].transpose(0, 1))


def materialize_ref(cache, src_slots, dst_slots, A, k=None, rounding="rn", validate=True, philox_rounds=10):
    """What `specssm.step.materialize` does, in float64: for each live pair, the source's checkpoint with
    its first k ring tokens folded in (`fold_slot`), rounded to the state dtype (RN, or SR with the
    destination's seed) as the destination's checkpoint; then pnat[dst] = 0, ring_start[dst] =
    (ring_start[src] + k) % L, seeds[dst] + 1. Always checks on the host (`validate` is accepted and
    unused). Returns {dst slot: (num_layers, H, P, N) float64 unrounded state} of the live pairs."""
    n, A_layers, k = transfer.check_materialize_args(cache, src_slots, dst_slots, A, k, rounding)
    pairs = transfer.check_pairs_host(src_slots, dst_slots, cache.num_slots, cache.pad_slot_id)
    transfer.check_fold_values_host(cache, src_slots, k, pairs)
    folded = {}
    moves = []
    for i in pairs.tolist():
        s, d = int(src_slots[i]), int(dst_slots[i])
        kk = int(cache.pnat[s]) if k is None else (k if isinstance(k, int) else int(k[i]))
        # every fold reads the sources as they were before any destination is written
        folded[d] = torch.stack([fold_slot(cache, layer, s, A_layers[layer], kk) for layer in range(cache.num_layers)])
        moves.append((d, (int(cache.ring_start[s]) + kk) % cache.L))
    for d, rs in moves:
        for layer, lc in enumerate(cache.layers):
            store(lc.state, lc.state_scale, d, folded[d][layer], rounding, cache.seeds, philox_rounds)
        cache.ring_start[d] = rs
        cache.pnat[d] = 0
        cache.seeds[d] += 1
    return folded
