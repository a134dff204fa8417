"""The coefficient kernel of the split step: everything a (row, head) needs that is not the state.

One program per (row, block of HB heads of one group). It reads the row's ring metadata, the dt and B
histories and the new dt, B, C once, and writes per (row, head):

    coef  (2, TM, NK)  the token x key coefficient matrix as a 16-bit (hi, lo) pair (the activation
                       dtype: the mains multiply it with x in one 16-bit product per part)
    vec   (VEC,)       fp32: [0, TM) exp(c_t) (the checkpoint's decay to token t); [KH, 2 KH) the fold
                       weights exp(Λ - c_k)·dt_k of the history keys; [2 KH] exp(Λ)

and appends the new dt (and, once per group, B) to the rings. Keys (DESIGN §3): history key k sits at
position k; the new tokens start at position K (no-write rows: one window of K + T <= W <= 16 keys, the
rectangle) or KH = 16 (write rows: history and new tokens apart, so the fold reads the history keys
alone). c is the running sum of A·dt, over the history and then on over the new tokens; token t's query
takes its own key's c, so its diagonal decay is exactly 1. D is folded into the diagonal, so the mains'
x·coef product also adds D·x.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from specssm.step.device import dot16, row_tokens, softplus, split_hi_lo, wrap

KH = tl.constexpr(16)    # history keys (the window's bound)
NK = tl.constexpr(32)    # key positions: history, then new tokens on write rows
VEC = 48                 # fp32 words per (row, head): decays, fold weights, exp(Λ)
TM = tl.constexpr(16)    # token rows per (row, head): the products' M side (T <= TM)


@triton.jit
def _first_cols(v, TO: tl.constexpr):
    """The first TO columns of a (R, KH) tile (TO = KH: all of it); with TO = KH / 2 the split takes a
    register half, no data movement."""
    if TO == v.shape[1]:
        out = v
    else:
        tl.static_assert(2 * TO == v.shape[1], "_first_cols: TO must be KH or KH / 2")
        out, _ = tl.split(tl.permute(tl.reshape(v, (v.shape[0], 2, TO)), (0, 2, 1)))
    return out


@triton.jit
def coef_kernel(
    pnat_ptr, ring_start_ptr, order_ptr, slots_ptr, counts_ptr, cu_ptr, dt_ptr, dt_bias_ptr, A_ptr, D_ptr,
    B_ptr, C_ptr, Bc_ptr, dtc_ptr, coef_ptr, vec_ptr,
    batch, T, W, L, N, HPG,
    s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_cf_b, s_cf_h, s_v_b, s_v_h,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    WAIT: tl.constexpr, LAUNCH_DEPS: tl.constexpr, UPCAST: tl.constexpr,
    HB: tl.constexpr, BLOCK_N: tl.constexpr, TO: tl.constexpr,
):
    """Program (row, head block): history keys k < K and new tokens s < n_tok as two blocks of KH keys
    each, queries t < TO (T <= TO). The blocks are stored at their key positions: history at k, new
    tokens at new0 + s. Programs run over the StepPlan's entries: the write and no-write groups; the
    padding group between them (padding rows, rows with a faulted slot / pnat / ring_start) does no
    work."""
    entry = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    if LAUNCH_DEPS:
        # the mains may start now: they load their state tiles while this grid finishes
        gdc_launch_dependents()
    n_write = tl.load(counts_ptr)
    n_live = tl.load(counts_ptr + 1)
    if (entry < n_write) | (entry >= batch - (n_live - n_write)):
        row = tl.load(order_ptr + entry)
        slot = tl.load(slots_ptr + entry).to(tl.int64)
        K = tl.load(pnat_ptr + slot)
        rs = tl.load(ring_start_ptr + slot)
        tok0, n_tok, row_off = row_tokens(cu_ptr, row, T, VARLEN)
        write = K + n_tok > W
        # the first new token's key position (a corrupt negative pnat must not move stores out of the row)
        new0 = tl.where(write, KH, tl.maximum(K, 0))
        heads = h0 + tl.arange(0, HB)
        g = h0 // HPG
        kk = tl.arange(0, KH)                    # history keys; new tokens as keys
        q = tl.arange(0, TO)                     # queries
        offs_n = tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        # history: ring rows rs + k; a corrupt ring_start or pnat is masked off, never read outside the ring
        ring_row = wrap(rs + kk, L)
        hist = (kk < K) & (ring_row >= 0) & (ring_row < L)
        new = kk < n_tok
        q_ok = q < n_tok

        dt_hist = tl.load(dtc_ptr + slot * s_dtc_s + heads[:, None] * s_dtc_h + ring_row[None, :],
                          mask=hist[None, :], other=0.0)                                       # (HB, KH)
        Bh = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + ring_row[:, None] * s_Bc_l + offs_n[None, :],
                     mask=hist[:, None] & n_ok[None, :], other=0.0)                          # (KH, BLOCK_N)
        if WAIT:
            gdc_wait()      # dt, B, C of the new tokens come from the kernel before (conv1d)
        dt_new = tl.load(dt_ptr + row_off * s_dt_b + (tok0 + kk)[None, :] * s_dt_t + heads[:, None] * s_dt_h,
                         mask=new[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_new += tl.load(dt_bias_ptr + heads).to(tl.float32)[:, None]
        if SOFTPLUS:
            dt_new = softplus(dt_new)
        dt_new = tl.where(new[None, :], dt_new, 0.0)                                         # (HB, KH)
        A = tl.load(A_ptr + heads).to(tl.float32)
        a_hist = A[:, None] * dt_hist
        c_hist = tl.cumsum(a_hist, axis=1)
        lam = tl.sum(a_hist, axis=1)
        c_new = lam[:, None] + tl.cumsum(A[:, None] * dt_new, axis=1)
        c_q = _first_cols(c_new, TO)             # the queries' c is their own keys' (diagonal decay 1)

        # C·Bᵀ over both key blocks (16-bit operands: exact products), queries cut to TO rows
        Bn = tl.load(B_ptr + row_off * s_B_b + (tok0 + kk)[:, None] * s_B_t + g * s_B_g + offs_n[None, :],
                     mask=new[:, None] & n_ok[None, :], other=0.0)                           # (KH, BLOCK_N)
        C = tl.load(C_ptr + row_off * s_B_b + (tok0 + kk)[:, None] * s_B_t + g * s_B_g + offs_n[None, :],
                    mask=new[:, None] & n_ok[None, :], other=0.0)                            # (KH, BLOCK_N)
        zero = tl.zeros((KH, KH), tl.float32)
        cb_hist = tl.trans(_first_cols(tl.trans(dot16(C, tl.trans(Bh), zero, UPCAST)), TO))    # (TO, KH)
        cb_new = tl.trans(_first_cols(tl.trans(dot16(C, tl.trans(Bn), zero, UPCAST)), TO))

        vis_h = q_ok[:, None] & hist[None, :]
        coef_h = cb_hist[None, :, :] * dt_hist[:, None, :] * tl.exp(
            tl.where(vis_h[None, :, :], c_q[:, :, None] - c_hist[:, None, :], float("-inf")))   # (HB, TO, KH)
        vis_n = q_ok[:, None] & new[None, :] & (kk[None, :] <= q[:, None])
        coef_n = cb_new[None, :, :] * dt_new[:, None, :] * tl.exp(
            tl.where(vis_n[None, :, :], c_q[:, :, None] - c_new[:, None, :], float("-inf")))
        if HAS_D:
            diag = q_ok[:, None] & (kk[None, :] == q[:, None])
            coef_n += tl.where(diag[None, :, :], tl.load(D_ptr + heads).to(tl.float32)[:, None, None], 0.0)
        # every key position the mains read is written once: history at k < new0 (zeros past K), new
        # tokens at new0 + s (zeros past n_tok); token rows past n_tok are masked by the mains. No mask
        # on keys there keeps their coefficient loads in the software pipeline.
        cf = coef_ptr + row * s_cf_b + heads[:, None, None] * s_cf_h + q[None, :, None] * NK
        mask_h = q_ok[None, :, None] & (kk < new0)[None, None, :]
        mask_n = q_ok[None, :, None] & (kk < KH)[None, None, :]
        hi, lo = split_hi_lo(coef_h, coef_ptr.dtype.element_ty)
        tl.store(cf + kk[None, None, :], hi, mask=mask_h)
        tl.store(cf + TM * NK + kk[None, None, :], lo, mask=mask_h)
        hi, lo = split_hi_lo(coef_n, coef_ptr.dtype.element_ty)
        tl.store(cf + (new0 + kk)[None, None, :], hi, mask=mask_n)
        tl.store(cf + TM * NK + (new0 + kk)[None, None, :], lo, mask=mask_n)

        v = vec_ptr + row * s_v_b + heads * s_v_h
        tl.store(v[:, None] + q[None, :], tl.exp(c_q), mask=q_ok[None, :])
        if write:
            w_fold = tl.where(hist[None, :], tl.exp(lam[:, None] - c_hist) * dt_hist, 0.0)
            tl.store(v[:, None] + KH + kk[None, :], w_fold)
            tl.store(v + 2 * KH, tl.exp(lam))

        # ring appends of the new dt (and B once per group): rows rs + K + s, disjoint from the history
        new_row = wrap(rs + K + kk, L)
        new_ok = new & (new_row >= 0) & (new_row < L)
        tl.store(dtc_ptr + slot * s_dtc_s + heads[:, None] * s_dtc_h + new_row[None, :], dt_new,
                 mask=new_ok[None, :])
        if h0 % HPG == 0:
            tl.store(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + new_row[:, None] * s_Bc_l + offs_n[None, :], Bn,
                     mask=new_ok[:, None] & n_ok[None, :])
    elif WAIT:
        gdc_wait()      # a padding entry: nothing to do, but the grid must not finish before its producer
