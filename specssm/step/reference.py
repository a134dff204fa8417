"""The step family's float64 references: one verify step of each strategy on the cache contract's
tensors, and `materialize_ref`.

These have the same signatures as the Triton ops (`specssm.ops`, `specssm.step.materialize`), mutate
the caches the same way and are the specification the kernels are tested against. They loop over rows
(pairs) in Python: small shapes only. Re-exported by `specssm.reference`.
"""
from __future__ import annotations

import torch

from specssm._checks import check_all_states_args, check_ssu_args
from specssm.cache import transfer
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state, encode_state


def row_tokens(b, shapes, cu_seqlens):
    """Token index range of row b: padded (batch, T) layout or packed varlen layout."""
    if cu_seqlens is None:
        return (b, slice(0, shapes.T))
    lo, hi = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
    return (slice(lo, hi),)


def sr_bits(seed, slot, shape, philox_rounds=10):
    """The uint32 random words (as int64) that stochastic rounding of slot `slot` uses: Philox keyed by
    (seed, flat element offset of the contiguous state pool), as the kernels draw them."""
    from specssm.quant import reference as qref
    H, P, N = shape
    offsets = slot * H * P * N + torch.arange(H * P * N, dtype=torch.int64).reshape(H, P, N)
    words = qref.random_words_ref(int(seed), offsets.numpy(), philox_rounds)
    return torch.from_numpy(words.astype("int64"))


def store(state, state_scale, slot, h, rounding, rand_seed, philox_rounds=10):
    bits = None
    if rounding == "sr":
        seed = rand_seed[slot] if isinstance(rand_seed, torch.Tensor) else rand_seed
        bits = sr_bits(seed, slot, tuple(h.shape), philox_rounds)
    q, scale = encode_state(h, state.dtype, rounding, bits)
    state[slot] = q
    if scale is not None:
        state_scale[slot] = scale


def checkpointing_ssu_ref(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
                          x, dt, A, B, C, out, D=None, z=None, dt_bias=None, dt_softplus=False,
                          state_batch_indices=None, pad_slot_id=-1, state_scale=None, rand_seed=None,
                          philox_rounds=10, cu_seqlens=None, max_seqlen=None, window=None,
                          rounding="rn", no_write_form="replay", faults=None):
    """Checkpointing replay, one step. Row b uses slot s = state_batch_indices[b] (b if None).

    History: ring rows (ring_start[s] + k) % L for k < pnat[s]. New tokens are appended at rows
    (ring_start[s] + pnat[s] + t) % L. A row writes its state (the history folded in, rounded) when
    pnat + len > W; otherwise the state is untouched. Outputs use the unrounded state.
    ring_start / pnat are not changed: `SSMCache.commit` does that after verification.
    `faults` (the kernels' no-sync fault record) is accepted and unused: the reference validates.
    """
    if no_write_form not in ("replay", "rectangle"):
        raise ValueError(f"no_write_form: expected 'replay' or 'rectangle', got {no_write_form!r}")
    # checked here, not when the first row stores: a rejected call must leave every cache untouched
    if rounding not in ("rn", "sr"):
        raise ValueError(f"rounding: expected 'rn' or 'sr', got {rounding!r}")
    if rounding == "sr" and rand_seed is None:
        raise ValueError("rand_seed: expected per-slot seeds (slots,) int64 or an int for rounding='sr', got None")
    sh, A_h, dt_c, D_h, bias_h = check_ssu_args(
        state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
        D, z, dt_bias, state_batch_indices, pad_slot_id, state_scale, cu_seqlens, max_seqlen, window)
    L, W = sh.L, sh.W
    for b in range(sh.batch):
        s = b if state_batch_indices is None else int(state_batch_indices[b])
        if s == pad_slot_id:
            continue
        tok = row_tokens(b, sh, cu_seqlens)
        xb, Bb, Cb = x[tok], B[tok], C[tok]
        n = xb.shape[0]
        if n == 0:
            continue
        dtb = rec.process_dt(dt_c[tok], bias_h, dt_softplus)
        zb = None if z is None else z[tok]
        K, rs = int(prev_num_accepted_tokens[s]), int(ring_start[s])
        hist = [(rs + k) % L for k in range(K)]
        xh = x_cache[s][:, hist].transpose(0, 1)                    # (K, H, P)
        Bh = B_cache[s][:, hist].transpose(0, 1)                    # (K, G, N)
        dth = dt_cache[s][:, hist].transpose(0, 1).double()         # (K, H)
        S = decode_state(state[s], None if state_scale is None else state_scale[s])
        write = K + n > W
        if write or no_write_form == "replay":
            hK = rec.fold(S, xh, dth, A_h, Bh)
            y, _ = rec.sequential(hK, xb, dtb, A_h, Bb, Cb, D_h, zb)
        else:
            y = rec.outputs_rectangle(S, xh, dth, Bh, xb, dtb, A_h, Bb, Cb, D_h, zb)
        out[tok] = y.to(out.dtype)
        if write:
            store(state, state_scale, s, hK, rounding, rand_seed, philox_rounds)
        new_rows = [(rs + K + t) % L for t in range(n)]
        x_cache[s][:, new_rows] = xb.transpose(0, 1)
        B_cache[s][:, new_rows] = Bb.transpose(0, 1)
        dt_cache[s][:, new_rows] = dtb.T.to(dt_cache.dtype)
    return out


def always_write_ssu_ref(*args, **kwargs):
    """Always-write replay: the checkpointing step with window 0, so every row writes its state
    (history = the accepted tokens of the previous step). Ring length must be >= 2T."""
    kwargs["window"] = 0
    return checkpointing_ssu_ref(*args, **kwargs)


def all_states_ssu_ref(states, state_index, x, dt, A, B, C, out, D=None, z=None, dt_bias=None,
                       dt_softplus=False, state_batch_indices=None, pad_slot_id=-1):
    """All-states: read states[s, state_index[s]], write all T intermediate states states[s, t].

    states `(slots, T, H, P, N)` float (fp32/bf16/fp16), state_index `(slots,)` int32; the commit
    selects the accepted one by setting state_index[s] = accepted - 1 (no copy).
    """
    N, G, dt_c, A_h, D_h, bias_h = check_all_states_args(
        states, state_index, x, dt, A, B, C, out, D, z, dt_bias, state_batch_indices, pad_slot_id)
    batch, T, H, P = x.shape
    rows = list(range(batch)) if state_batch_indices is None else state_batch_indices.tolist()
    live = [s for s in rows if s != pad_slot_id]
    bad = [s for s in live if not 0 <= int(state_index[s]) < T]
    if bad:
        raise ValueError(f"state_index: expected values in [0, {T}) for the slots of this step, got "
                         f"{int(state_index[bad[0]])} for slot {bad[0]}")
    for b in range(batch):
        s = b if state_batch_indices is None else int(state_batch_indices[b])
        if s == pad_slot_id:
            continue
        h = states[s, int(state_index[s])].double()
        dtb = rec.process_dt(dt_c[b], bias_h, dt_softplus)
        ys = []
        for t in range(T):
            zt = None if z is None else z[b, t:t + 1]
            y, h = rec.sequential(h, x[b, t:t + 1], dtb[t:t + 1], A_h, B[b, t:t + 1], C[b, t:t + 1], D_h, zt)
            states[s, t] = h.to(states.dtype)
            ys.append(y[0])
        out[b] = torch.stack(ys).to(out.dtype)
    return out


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
