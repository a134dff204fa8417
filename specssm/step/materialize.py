"""Materialize slot states on the device: fold the first k ring tokens of source slots into their
checkpoints and store the result as the destinations' fresh checkpoints (prefix caching, swap-out, an
early flush when src == dst).

One launch per layer (each layer's pool is its own tensor), one program per (pair, head, tile of
BLOCK_P state rows). A program computes the fold weights from the ring's dt and A itself (there is no
coefficient kernel before it), then folds with the write main's device function (specssm/step/fold.py)
and stores with its storage functions (specssm/step/store.py):

    c_k = Σ_{j<=k} A·dt_j,  Λ = c_{K-1},  w_k = exp(Λ - c_k)·dt_k,  h = exp(Λ)·S + (X_hist·w)ᵀ @ B_hist

Around the folds, two small launches: `pairs_kernel` resolves the pairs before them (slot ids, k and
ring_start checked against the contract, faults recorded, each pair's source ring position read once)
and `finish_kernel` sets the destinations' pnat / ring_start / seeds after the last one. So every layer
reads the sources' ring position as it was, whatever the pairs' order, and src == dst is safe: a
program reads its tile before it writes it, and no other program touches that tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._checks import MAX_WINDOW, check_triton_device
from specssm._runtime import interpreting
from specssm.cache import faults, transfer
from specssm.step.device import tile_masks, wrap
from specssm.step.fold import fold_history
from specssm.step.store import STATE_KIND, store_state_tile

MAX_TILE = 8192      # state elements per program (64 x 128), as the step's tiles
# warps per fold program: SR's Philox rounds need the registers of 8 (at 4, sm_90 spills for fp16)
FOLD_WARPS = {"rn": 4, "sr": 8}
PAIR_BLOCK = 128     # pairs per program of the pair launches
PAIR_CHUNK = 32      # pairs compared at a time with a program's pairs (the clash test)
NO_FAULT = tl.constexpr(faults.NO_FAULT)
# rows of the pairs_kernel's output: what the fold reads (src, dst, k, ring_start), then the finish
SRC, DST, K, RS, NEW_RS = (tl.constexpr(i) for i in range(5))


@triton.jit
def _fold_weights(A, dt_hist, hist):
    """(w, exp(Λ)) of a history of KH keys (dt_hist 0 past the keys to fold), as the coefficient kernel
    computes them: c = running sum of A·dt, Λ its total, w_k = exp(Λ - c_k)·dt_k (0 off the history)."""
    a = A * dt_hist
    c = tl.cumsum(a, axis=0)
    lam = tl.sum(a, axis=0)
    return tl.where(hist, tl.exp(lam - c) * dt_hist, 0.0), tl.exp(lam)


@triton.jit
def materialize_kernel(
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, A_ptr, src_ptr, dst_ptr, k_ptr, rs_ptr, seed_ptr,
    L, s_A, s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h, s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l,
    s_dtc_s, s_dtc_h,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HPG: tl.constexpr, NPT: tl.constexpr,
    KIND: tl.constexpr, SR: tl.constexpr, SR_ROWS: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KH: tl.constexpr,
):
    """Program (pair, state-row tile, head). Pairs with dst < 0 (padding, or dropped by the device-side
    checks) do nothing."""
    EVEN_TILE: tl.constexpr = (P % BLOCK_P == 0) and (N == BLOCK_N)
    pid = tl.program_id(0)
    h = pid % H
    pt = (pid // H) % NPT
    pair = pid // (H * NPT)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    if dst >= 0:
        src = tl.load(src_ptr + pair).to(tl.int64)
        K = tl.load(k_ptr + pair)
        rs = tl.load(rs_ptr + pair)
        offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        p_ok, n_ok = tile_masks(offs_p, offs_n, P, N, EVEN_TILE)
        st_row = offs_p * s_st_p
        st_off = st_row[:, None] + offs_n[None, :]
        st_mask = p_ok[:, None] & n_ok[None, :]
        S = tl.load(state_ptr + src * s_st_s + h * s_st_h + st_off, mask=st_mask, other=0.0)
        if KIND >= 3:
            S_scale = tl.load(scale_ptr + src * s_sc_s + h * s_sc_h + offs_p, mask=p_ok, other=0.0)
        else:
            S_scale = 1.0
        kk = tl.arange(0, KH)
        ring_row = wrap(rs + kk, L)
        hist = (kk < K) & (ring_row >= 0) & (ring_row < L)
        dt_hist = tl.load(dtc_ptr + src * s_dtc_s + h * s_dtc_h + ring_row, mask=hist, other=0.0)
        w, decay = _fold_weights(tl.load(A_ptr + h * s_A).to(tl.float32), dt_hist, hist)
        Xh = tl.load(xc_ptr + src * s_xc_s + h * s_xc_h + ring_row[:, None] * s_xc_l + offs_p[None, :],
                     mask=hist[:, None] & p_ok[None, :], other=0.0)                            # (KH, BLOCK_P)
        Bh = tl.load(Bc_ptr + src * s_Bc_s + (h // HPG) * s_Bc_g + ring_row[:, None] * s_Bc_l + offs_n[None, :],
                     mask=hist[:, None] & n_ok[None, :], other=0.0)                           # (KH, BLOCK_N)
        hK = fold_history(S, S_scale, Xh, Bh, w, decay, KIND, UPCAST)
        dst_pool = dst * s_st_s + h * s_st_h
        store_state_tile(hK, state_ptr + dst_pool, scale_ptr + dst * s_sc_s + h * s_sc_h, st_off, st_row, st_mask,
                         offs_p, p_ok, seed_ptr, dst, dst_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)


@triton.jit
def _pair_ids(src_ptr, dst_ptr, rows, in_n, n, num_slots, pad_slot_id):
    """Slot ids of pairs `rows` and their state: live (a destination that is not padding), and ids made
    unique where not live or out of range (dst -1 - row, src -1 - n - row) for the clash test."""
    src = tl.load(src_ptr + rows, mask=in_n, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + rows, mask=in_n, other=pad_slot_id).to(tl.int64)
    live = in_n & (dst != pad_slot_id)
    src_ok = (src >= 0) & (src < num_slots)
    dst_ok = (dst >= 0) & (dst < num_slots)
    # int32 ids (slots and -1 - n - row fit): the clash test compares BLOCK x BLOCK_J of them
    d = tl.where(live & dst_ok, dst, -1 - rows).to(tl.int32)
    s = tl.where(live & src_ok, src, -1 - n - rows).to(tl.int32)
    return src, dst, live, src_ok, dst_ok, d, s


@triton.jit
def pairs_kernel(src_ptr, dst_ptr, k_ptr, pnat_ptr, rs_ptr, faults_ptr, out_ptr, n, num_slots, pad_slot_id,
                 max_pnat, L, k_value, K_MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program over BLOCK pairs. A live pair breaking the contract (a slot id outside the pool, the
    source's pnat or ring_start outside [0, max_pnat] / [0, L), k outside [0, pnat], or a destination
    that is another pair's destination or source) is dropped (dst -1) and recorded: the fault key of its
    first failed check, the smallest over the block folded into the record by one atomic min. K_MODE:
    0 k = the source's pnat, 1 k = k_value, 2 k from k_ptr. Writes out (5, n) int32: src, dst, k,
    ring_start (what the folds read; dst -1 for dropped and padding pairs) and the destinations' next
    ring_start."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = rows < n
    src, dst, live, src_ok, dst_ok, d, s = _pair_ids(src_ptr, dst_ptr, rows, in_n, n, num_slots, pad_slot_id)
    # entry num_slots of the per-slot arrays is the commit's scratch: any value, masked below
    s_idx = tl.where(live & src_ok, src, num_slots)
    pn = tl.load(pnat_ptr + s_idx).to(tl.int64)
    rs = tl.load(rs_ptr + s_idx).to(tl.int64)
    if K_MODE == 0:
        kk = pn
    elif K_MODE == 1:
        kk = tl.zeros_like(pn) + k_value
    else:
        kk = tl.load(k_ptr + rows, mask=in_n, other=0).to(tl.int64)
    pnat_ok = (pn >= 0) & (pn <= max_pnat)
    rs_ok = (rs >= 0) & (rs < L)
    k_ok = (kk >= 0) & (kk <= pn)
    # a destination equal to another pair's destination or source (ids unique where not live)
    clash = tl.zeros((BLOCK,), tl.int32)
    for j0 in range(0, n, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        _, _, _, _, _, dj, sj = _pair_ids(src_ptr, dst_ptr, cols, cols < n, n, num_slots, pad_slot_id)
        hit = ((d[:, None] == dj[None, :]) | (d[:, None] == sj[None, :])) & (rows[:, None] != cols[None, :])
        hit = hit & (cols < n)[None, :]
        clash = clash | tl.max(hit.to(tl.int32), axis=1)
    alias = clash != 0
    # the first check a live pair fails, in the order the host checks run
    field = tl.where(~dst_ok, 6, tl.where(~src_ok, 5, tl.where(~pnat_ok, 2, tl.where(~rs_ok, 3, tl.where(~k_ok, 7,
                                                                                                      6)))))
    value = tl.where(~dst_ok, dst, tl.where(~src_ok, src, tl.where(~pnat_ok, pn, tl.where(~rs_ok, rs, tl.where(
        ~k_ok, kk, dst)))))
    ok = live & dst_ok & src_ok & pnat_ok & rs_ok & k_ok & ~alias
    bad = live & ~ok
    key = tl.where(bad, (rows.to(tl.int64) << 36) | (field.to(tl.int64) << 32) | (value & 0xFFFFFFFF), NO_FAULT)
    tl.atomic_min(faults_ptr, tl.min(key, axis=0))
    tl.store(out_ptr + SRC * n + rows, tl.where(ok, src, -1).to(tl.int32), mask=in_n)
    tl.store(out_ptr + DST * n + rows, tl.where(ok, dst, -1).to(tl.int32), mask=in_n)
    tl.store(out_ptr + K * n + rows, tl.where(ok, kk, 0).to(tl.int32), mask=in_n)
    tl.store(out_ptr + RS * n + rows, tl.where(ok, rs, 0).to(tl.int32), mask=in_n)
    tl.store(out_ptr + NEW_RS * n + rows, tl.where(ok, (rs + kk) % L, 0).to(tl.int32), mask=in_n)


@triton.jit
def finish_kernel(pairs_ptr, pnat_ptr, rs_ptr, seed_ptr, n, BLOCK: tl.constexpr):
    """After the folds: each kept destination is a fresh checkpoint (pnat 0, ring_start past the folded
    tokens) and its seed advances, so its next rounding draws new bits. Kept destinations are distinct."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = rows < n
    dst = tl.load(pairs_ptr + DST * n + rows, mask=in_n, other=-1).to(tl.int64)
    keep = in_n & (dst >= 0)
    tl.store(rs_ptr + dst, tl.load(pairs_ptr + NEW_RS * n + rows, mask=keep, other=0), mask=keep)
    tl.store(pnat_ptr + dst, tl.zeros((BLOCK,), tl.int32), mask=keep)
    tl.store(seed_ptr + dst, tl.load(seed_ptr + dst, mask=keep, other=0) + 1, mask=keep)


def _launch_layer(lc, A_h, pairs, seeds, L, sizes, rounding, philox_rounds):
    """One layer's launch over the pairs (pairs_kernel's output: rows src, dst, k, ring_start)."""
    src, dst, k, rs = pairs[:4]
    H, P, N, G = sizes
    state, scale = lc.state, lc.state_scale
    block_n = max(16, triton.next_power_of_2(N))
    block_p = min(64, max(16, triton.next_power_of_2(P)), max(16, MAX_TILE // block_n))
    npt = triton.cdiv(P, block_p)
    quant = scale is not None
    dummy = torch.empty(1, dtype=torch.float32, device=state.device)
    materialize_kernel[(src.shape[0] * npt * H,)](
        state_ptr=state, scale_ptr=scale if quant else dummy, xc_ptr=lc.x_cache, Bc_ptr=lc.B_cache,
        dtc_ptr=lc.dt_cache, A_ptr=A_h, src_ptr=src, dst_ptr=dst, k_ptr=k, rs_ptr=rs, seed_ptr=seeds,
        L=L, s_A=A_h.stride(0), s_st_s=state.stride(0), s_st_h=state.stride(1), s_st_p=state.stride(2),
        s_sc_s=scale.stride(0) if quant else 0, s_sc_h=scale.stride(1) if quant else 0,
        s_xc_s=lc.x_cache.stride(0), s_xc_h=lc.x_cache.stride(1), s_xc_l=lc.x_cache.stride(2),
        s_Bc_s=lc.B_cache.stride(0), s_Bc_g=lc.B_cache.stride(1), s_Bc_l=lc.B_cache.stride(2),
        s_dtc_s=lc.dt_cache.stride(0), s_dtc_h=lc.dt_cache.stride(1),
        H=H, P=P, N=N, HPG=H // G, NPT=npt, KIND=STATE_KIND[state.dtype], SR=rounding == "sr",
        # SR draws one Philox per four elements when every state row starts on a multiple of 4
        SR_ROWS=block_n % 4 == 0 and all(st % 4 == 0 for st in state.stride()[:3]),
        PHILOX_ROUNDS=int(philox_rounds), UPCAST=interpreting() or lc.B_cache.dtype == torch.float32,
        BLOCK_P=block_p, BLOCK_N=block_n, KH=MAX_WINDOW, num_warps=FOLD_WARPS[rounding])


def _materialize(cache, src_slots, dst_slots, A, k=None, rounding="rn", validate=True, philox_rounds=10):
    """The launcher: checks every argument before anything is written, resolves the pairs on the
    device (pairs_kernel), folds once per layer, then sets the destinations' ring position and seeds
    (finish_kernel)."""
    n, A_layers, k = transfer.check_materialize_args(cache, src_slots, dst_slots, A, k, rounding)
    if cache.dt_dtype != torch.float32:
        raise TypeError(f"cache: expected float32 dt_cache for the Triton kernel, got {cache.dt_dtype} "
                        f"(specssm.reference.materialize_ref folds float64 caches)")
    if cache.state_dtype not in STATE_KIND:
        raise TypeError(f"cache: expected a state dtype in {[str(d) for d in STATE_KIND]}, got {cache.state_dtype}")
    check_triton_device("cache", cache.device)
    if validate:
        pairs = transfer.check_pairs_host(src_slots, dst_slots, cache.num_slots, cache.pad_slot_id)
        transfer.check_fold_values_host(cache, src_slots, k, pairs)
    if n == 0:
        return
    pairs = torch.empty(5, n, dtype=torch.int32, device=cache.device)
    grid = (triton.cdiv(n, PAIR_BLOCK),)
    k_mode = 0 if k is None else (1 if isinstance(k, int) else 2)
    pairs_kernel[grid](
        src_ptr=src_slots, dst_ptr=dst_slots, k_ptr=k if k_mode == 2 else src_slots, pnat_ptr=cache._pnat,
        rs_ptr=cache._ring_start, faults_ptr=cache.faults, out_ptr=pairs, n=n, num_slots=cache.num_slots,
        pad_slot_id=cache.pad_slot_id, max_pnat=max(cache.W, cache.T), L=cache.L,
        k_value=k if k_mode == 1 else 0, K_MODE=k_mode, BLOCK=PAIR_BLOCK, BLOCK_J=PAIR_CHUNK, num_warps=4)
    sizes = (cache.H, cache.P, cache.N, cache.G)
    for lc, A_h in zip(cache.layers, A_layers):
        _launch_layer(lc, A_h, pairs, cache.seeds, cache.L, sizes, rounding, philox_rounds)
    finish_kernel[grid](pairs_ptr=pairs, pnat_ptr=cache._pnat, rs_ptr=cache._ring_start, seed_ptr=cache._seeds,
                        n=n, BLOCK=PAIR_BLOCK, num_warps=4)


def materialize(cache, src_slots, dst_slots, A, k=None, rounding="rn", validate=True, philox_rounds=10):
    """Fold the first k ring tokens of each source slot into its checkpoint and store the result, in the
    cache's state dtype, as the destination's fresh checkpoint (pnat 0). Mutates `cache`; returns None.

    Args:
        cache: an `SSMCache` of a ring strategy ("checkpointing", "always_write"); every layer is folded.
        src_slots, dst_slots: (n,) int32 / int64 on the cache's device; pair i takes slot src_slots[i] to
            dst_slots[i]. dst_slots[i] == cache.pad_slot_id: padding, the pair does nothing. Live
            destinations are distinct and none is another pair's source; src == dst is allowed (an early
            flush). A source may feed several destinations.
        A: per layer, the (negative) per-head A: a list of num_layers tensors, each (H,) or the mamba
            convention's tied (H, P, N) view, or one (num_layers, H) tensor; any float dtype.
        k: ring tokens to fold per pair: None (each source's pnat: the slot's true state), an int, or an
            (n,) int32 / int64 tensor on the device, with 0 <= k <= pnat of the source. Tokens past k are
            not carried over: the destination holds the state after the source's first k tokens.
        rounding: "rn" (round to nearest even) or "sr" (stochastic, Philox bits keyed by the destination's
            seed in `cache.seeds` and the element's offset in the pool); int8 / fp8 / int16 states get new
            per-row scales.
        validate: check slot ids, the sources' pnat / ring_start and k on the host (one sync on a GPU).
            validate=False (CUDA graphs): no host sync; a pair breaking the contract does nothing and is
            recorded in cache.faults (`cache.raise_if_faulted()` names the first, by pair index).
        philox_rounds: rounds of the Philox generator for "sr".

    After the call, for every live pair: the destination's checkpoint is the fold, pnat[dst] = 0,
    ring_start[dst] = (ring_start[src] + k) % L (the next step appends after the folded tokens), and
    seeds[dst] advances by one (its next rounding draws new bits). Other slots are left bit-identical.
    One fold launch per layer, fixed grid (pairs x heads x state-row tiles), between one launch that
    resolves the pairs and one that sets the destinations' metadata; no host sync with validate=False:
    CUDA-graph safe. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1. The float64
    reference with the same signature is `specssm.reference.materialize_ref`.
    """
    _materialize(cache, src_slots, dst_slots, A, k, rounding, validate, philox_rounds)
