"""Materialize slot states on the device: fold the first k ring tokens of source slots into their
checkpoints and store the result as the destinations' fresh checkpoints (prefix caching, swap-out, an
early flush when src == dst).

One launch per layer (each layer's pool is its own tensor), one program per (pair, head, tile of
BLOCK_P state rows). A program computes the fold weights from the ring's dt and A itself (there is no
coefficient kernel before it), then folds with the write main's device function (specssm/step/fold.py)
and stores with its storage functions (specssm/step/store.py):

    c_k = Σ_{j<=k} A·dt_j,  Λ = c_{K-1},  w_k = exp(Λ - c_k)·dt_k,  h = exp(Λ)·S + (X_hist·w)ᵀ @ B_hist

The pairs' slot ids, k and ring_start are resolved before the launches (specssm/cache/transfer.py) and
the destinations' pnat / ring_start / seeds set after the last one, so every layer reads the sources'
ring position as it was, whatever the pairs' order, and src == dst is safe: a program reads its tile
before it writes it, and no other program touches that tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._checks import MAX_WINDOW, check_triton_device
from specssm._runtime import interpreting
from specssm.cache import transfer
from specssm.step.device import tile_masks, wrap
from specssm.step.fold import fold_history
from specssm.step.store import STATE_KIND, store_state_tile

MAX_TILE = 8192      # state elements per program (64 x 128), as the step's tiles


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


def _launch_layer(lc, A_h, pairs, seeds, L, sizes, rounding, philox_rounds):
    """One layer's launch over the pairs (src, dst, k, ring_start as (n,) int32 device tensors)."""
    src, dst, k, rs = pairs
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
        BLOCK_P=block_p, BLOCK_N=block_n, KH=MAX_WINDOW, num_warps=4)


def _materialize(cache, src_slots, dst_slots, A, k=None, rounding="rn", validate=True, philox_rounds=10):
    """The launcher: checks every argument before anything is written, resolves the pairs on the
    device, launches once per layer, then sets the destinations' ring position and seeds."""
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
    pairs, (idx, new_rs) = transfer.fold_pairs(cache, src_slots, dst_slots, k)
    sizes = (cache.H, cache.P, cache.N, cache.G)
    for lc, A_h in zip(cache.layers, A_layers):
        _launch_layer(lc, A_h, pairs, cache.seeds, cache.L, sizes, rounding, philox_rounds)
    transfer.finish_fold(cache, idx, new_rs)


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
    One launch per layer, fixed grid (pairs x heads x state-row tiles), no host sync with
    validate=False: CUDA-graph safe. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1. The float64
    reference with the same signature is `specssm.reference.materialize_ref`.
    """
    _materialize(cache, src_slots, dst_slots, A, k, rounding, validate, philox_rounds)
