"""The coefficient kernel of the split step: everything a (row, head) needs that is not the state.

One program per (row, block of HB heads of one group). It reads the row's ring metadata, the dt and B
histories and the new dt, B, C once, and writes per (row, head):

    coef  (2, TM, NK)  the token x key coefficient matrix as a 16-bit (hi, lo) pair (the activation
                       dtype: the mains multiply it with x in one 16-bit product per part)
    vec   (VEC,)       fp32: [0, TM) exp(c_t) (the checkpoint's decay to token t); [KH, 2 KH) the fold
                       weights exp(Λ - c_k)·dt_k of the history keys; [2 KH] exp(Λ)

and appends the new dt (and, once per group, B) to the rings. Keys (docs/design.md): history key k sits at
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

from specssm.step.device import dot16, exp2, row_tokens, softplus, split_hi_lo, wrap

KH = tl.constexpr(16)    # history keys (the window's bound)
NK = tl.constexpr(32)    # key positions: history, then new tokens on write rows
VEC = 48                 # fp32 words per (row, head): decays, fold weights, exp(Λ)
TM = tl.constexpr(16)    # token rows per (row, head): the products' M side (T <= TM)
LOG2E = tl.constexpr(1.4426950408889634)
CHUNK_N = 32             # B and C columns per step of the C·Bᵀ loop (at most BLOCK_N)


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
    HB: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr, TO: tl.constexpr,
):
    """Program (row, head block): history keys k < K and new tokens s < n_tok as two blocks of KH keys
    each, queries t < TO (T <= TO). The blocks are stored at their key positions: history at k, new
    tokens at KH + s (write rows) or K + s (no-write rows). Programs run over the StepPlan's entries:
    the write and no-write groups; the padding group between them (padding rows, rows with a faulted
    slot / pnat / ring_start) does no work."""
    entry = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    if LAUNCH_DEPS:
        # the mains may start now: they load their state tiles while this grid finishes
        gdc_launch_dependents()
    # the counts, the row and its slot in one round of loads (every entry < batch holds valid ids)
    n_write = tl.load(counts_ptr)
    n_live = tl.load(counts_ptr + 1)
    row = tl.load(order_ptr + entry)
    slot = tl.load(slots_ptr + entry).to(tl.int64)
    if (entry < n_write) | (entry >= batch - (n_live - n_write)):
        K = tl.load(pnat_ptr + slot)
        rs = tl.load(ring_start_ptr + slot)
        tok0, n_tok, row_off = row_tokens(cu_ptr, row, T, VARLEN)
        write = K + n_tok > W
        heads = h0 + tl.arange(0, HB)
        g = h0 // HPG
        kk = tl.arange(0, KH)                    # history keys; new tokens as keys
        q = tl.arange(0, TO)                     # queries
        # history: ring rows rs + k; a corrupt ring_start or pnat is masked off, never read outside the ring
        ring_row = wrap(rs + kk, L)
        hist = (kk < K) & (ring_row >= 0) & (ring_row < L)
        new = kk < n_tok

        dt_hist = tl.load(dtc_ptr + slot * s_dtc_s + heads[:, None] * s_dtc_h + ring_row[None, :],
                          mask=hist[None, :], other=0.0)                                       # (HB, KH)
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

        # C·Bᵀ over both key blocks (16-bit operands: exact products), over N in chunks so no whole
        # (KH, N) tile is held in registers; the ring append of the new B rides on the same loads
        new_row = wrap(rs + K + kk, L)
        new_ok = new & (new_row >= 0) & (new_row < L)
        cb_hist = tl.zeros((KH, KH), tl.float32)
        cb_new = tl.zeros((KH, KH), tl.float32)
        for n0 in tl.range(0, BLOCK_N, CHUNK_N, num_stages=4):
            offs_c = n0 + tl.arange(0, CHUNK_N)
            c_ok = offs_c < N
            Bh = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + ring_row[:, None] * s_Bc_l + offs_c[None, :],
                         mask=hist[:, None] & c_ok[None, :], other=0.0)                      # (KH, CHUNK_N)
            Bn = tl.load(B_ptr + row_off * s_B_b + (tok0 + kk)[:, None] * s_B_t + g * s_B_g + offs_c[None, :],
                         mask=new[:, None] & c_ok[None, :], other=0.0)
            C = tl.load(C_ptr + row_off * s_B_b + (tok0 + kk)[:, None] * s_B_t + g * s_B_g + offs_c[None, :],
                        mask=new[:, None] & c_ok[None, :], other=0.0)
            cb_hist = dot16(C, tl.trans(Bh), cb_hist, UPCAST)
            cb_new = dot16(C, tl.trans(Bn), cb_new, UPCAST)
            if h0 % HPG == 0:
                tl.store(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + new_row[:, None] * s_Bc_l + offs_c[None, :], Bn,
                         mask=new_ok[:, None] & c_ok[None, :])
        cb_hist = tl.trans(_first_cols(tl.trans(cb_hist), TO))                                 # (TO, KH)
        cb_new = tl.trans(_first_cols(tl.trans(cb_new), TO))

        # exp(c_t - c_k) as exp2 of pre-scaled sums; a dead history key's +inf makes its coefficient 0.
        # Query rows past n_tok are written too (finite: their C rows are zero) and never read.
        ch = tl.where(hist[None, :], c_hist * LOG2E, float("inf"))
        cn = c_new * LOG2E
        cq = _first_cols(cn, TO)
        coef_h = cb_hist[None, :, :] * dt_hist[:, None, :] * exp2(cq[:, :, None] - ch[:, None, :])  # (HB, TO, KH)
        coef_n = cb_new[None, :, :] * dt_new[:, None, :] * exp2(cq[:, :, None] - cn[:, None, :])
        # a key after its query is dropped by a select (its exponent is positive: a product could be inf·0)
        coef_n = tl.where((kk[None, :] <= q[:, None])[None, :, :], coef_n, 0.0)
        if HAS_D:
            diag = kk[None, :] == q[:, None]
            coef_n += tl.where(diag[None, :, :], tl.load(D_ptr + heads).to(tl.float32)[:, None, None], 0.0)
        # every key position the mains read is written, in whole aligned 16-key blocks (vector stores):
        # write rows put the history keys at [0, KH) (zeros past K) and the new tokens at [KH, 2 KH);
        # no-write rows one window at [0, KH): history keys k < K, new token s at K + s (a gather moves
        # the new block there). No mask on keys in the mains keeps their loads in the software pipeline.
        cf = coef_ptr + row * s_cf_b + heads[:, None, None] * s_cf_h + q[None, :, None] * NK + kk[None, None, :]
        if write:
            hi, lo = split_hi_lo(coef_h, coef_ptr.dtype.element_ty)
            tl.store(cf, hi)
            tl.store(cf + TM * NK, lo)
            hi, lo = split_hi_lo(coef_n, coef_ptr.dtype.element_ty)
            tl.store(cf + KH, hi)
            tl.store(cf + TM * NK + KH, lo)
        else:
            # clamped: a plan built without checks may hand a corrupt (negative) pnat
            shift = tl.broadcast_to(tl.minimum(tl.maximum(kk - K, 0), KH - 1)[None, None, :], (HB, TO, KH))
            coef_w = tl.where((kk < K)[None, None, :], coef_h, tl.gather(coef_n, shift, 2))
            hi, lo = split_hi_lo(coef_w, coef_ptr.dtype.element_ty)
            tl.store(cf, hi)
            tl.store(cf + TM * NK, lo)

        v = vec_ptr + row * s_v_b + heads * s_v_h
        tl.store(v[:, None] + q[None, :], exp2(cq))
        if write:
            w_fold = tl.where(hist[None, :], tl.exp(lam[:, None] - c_hist) * dt_hist, 0.0)
            tl.store(v[:, None] + KH + kk[None, :], w_fold)
            tl.store(v + 2 * KH, tl.exp(lam))

        # ring append of the new dt: rows rs + K + s, disjoint from the history
        tl.store(dtc_ptr + slot * s_dtc_s + heads[:, None] * s_dtc_h + new_row[None, :], dt_new,
                 mask=new_ok[None, :])
    elif WAIT:
        gdc_wait()      # a padding entry: nothing to do, but the grid must not finish before its producer
