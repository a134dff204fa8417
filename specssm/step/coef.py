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
def _store_hi_lo(cf, v):
    """The fp32 coefficients v as the (hi, lo) pair the mains read: hi at cf, lo one part (TM x NK) on."""
    hi, lo = split_hi_lo(v, cf.dtype.element_ty)
    tl.store(cf, hi)
    tl.store(cf + TM * NK, lo)


@triton.jit
def _cols_ok(offs_c, N, EVEN_N: tl.constexpr):
    """Columns of B / C inside N; EVEN_N (N a power of two): constant true, no predicate per element."""
    if EVEN_N:
        ok = tl.full((offs_c.shape[0],), 1, tl.int1)
    else:
        ok = offs_c < N
    return ok


@triton.jit
def _dt_of(dt_rows, tok, ok, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Processed dt (HB, KH) of tokens `tok` where `ok` (0 elsewhere): + dt_bias, softplus."""
    dt = tl.load(dt_rows + tok[None, :], mask=ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias[:, None]
    if SOFTPLUS:
        dt = softplus(dt)
    return tl.where(ok[None, :], dt, 0.0)


@triton.jit
def _apart_keys(dt_rows, B_rows, C_rows, Bc_rows, dtc_rows, cf, v, K, n_tok, ring_row, hist, new_row, new_ok,
                dt_hist, A, bias, Dh, N, s_tok_dt, s_tok_B, s_Bc_l, append_B,
                HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, UPCAST: tl.constexpr,
                EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr, TO: tl.constexpr):
    """A write row: history keys k < K at positions [0, KH), new tokens s < n_tok at [KH, 2 KH), plus the
    fold weights and exp(Λ)."""
    kk = tl.arange(0, KH)
    q = tl.arange(0, TO)
    new = kk < n_tok
    dt_new = _dt_of(dt_rows, kk * s_tok_dt, new, bias, HAS_BIAS, SOFTPLUS)                # (HB, KH)
    a_hist = A[:, None] * dt_hist
    c_hist = tl.cumsum(a_hist, axis=1)
    lam = tl.sum(a_hist, axis=1)
    c_new = lam[:, None] + tl.cumsum(A[:, None] * dt_new, axis=1)

    # C·Bᵀ over both key blocks (16-bit operands: exact products), over N in chunks so no whole (KH, N)
    # tile is held in registers; the ring append of the new B rides on the same loads
    cb_hist = tl.zeros((KH, KH), tl.float32)
    cb_new = tl.zeros((KH, KH), tl.float32)
    for n0 in tl.range(0, BLOCK_N, CHUNK_N, num_stages=4):
        offs_c = n0 + tl.arange(0, CHUNK_N)
        c_ok = _cols_ok(offs_c, N, EVEN_N)
        Bh = tl.load(Bc_rows + (ring_row * s_Bc_l)[:, None] + offs_c[None, :], mask=hist[:, None] & c_ok[None, :],
                     other=0.0)                                                               # (KH, CHUNK_N)
        Bn = tl.load(B_rows + (kk * s_tok_B)[:, None] + offs_c[None, :], mask=new[:, None] & c_ok[None, :],
                     other=0.0)
        C = tl.load(C_rows + (kk * s_tok_B)[:, None] + offs_c[None, :], mask=new[:, None] & c_ok[None, :],
                    other=0.0)
        cb_hist = dot16(C, tl.trans(Bh), cb_hist, UPCAST)
        cb_new = dot16(C, tl.trans(Bn), cb_new, UPCAST)
        if append_B:
            tl.store(Bc_rows + (new_row * s_Bc_l)[:, None] + offs_c[None, :], Bn,
                     mask=new_ok[:, None] & c_ok[None, :])
    cb_hist = tl.trans(_first_cols(tl.trans(cb_hist), TO))                                     # (TO, KH)
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
        coef_n += tl.where((kk[None, :] == q[:, None])[None, :, :], Dh[:, None, None], 0.0)
    _store_hi_lo(cf, coef_h)
    _store_hi_lo(cf + KH, coef_n)
    tl.store(v[:, None] + q[None, :], exp2(cq))
    tl.store(v[:, None] + KH + kk[None, :], tl.where(hist[None, :], tl.exp(lam[:, None] - c_hist) * dt_hist, 0.0))
    tl.store(v + 2 * KH, tl.exp(lam))
    # ring append of the new dt: rows rs + K + s, disjoint from the history
    tl.store(dtc_rows + new_row[None, :], dt_new, mask=new_ok[None, :])


@triton.jit
def _window_keys(dt_rows, B_rows, C_rows, Bc_rows, dtc_rows, cf, v, K, n_tok, ring_row, hist, dt_hist, A, bias,
                 Dh, L, N, s_tok_dt, s_tok_B, s_Bc_l, append_B,
                 HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, UPCAST: tl.constexpr,
                 EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr, TO: tl.constexpr):
    """A no-write row: one window of KH key positions, history key k at k, new token s at K + s (K + n_tok
    <= W <= KH). Position j reads its dt and B from the ring (j < K) or from the new tokens, so one
    C·Bᵀ product and one coefficient tile cover both; the new tokens' ring rows are rs + j, the same
    addresses as the history's, so the appends store the window rows that are new."""
    kk = tl.arange(0, KH)
    q = tl.arange(0, TO)
    s_new = kk - K
    is_new = (s_new >= 0) & (s_new < n_tok)
    key_ok = hist | is_new
    tok = tl.where(is_new, s_new, 0)
    append = is_new & (ring_row >= 0) & (ring_row < L)
    dt_w = tl.where(is_new[None, :], _dt_of(dt_rows, tok * s_tok_dt, is_new, bias, HAS_BIAS, SOFTPLUS), dt_hist)
    c_w = tl.cumsum(A[:, None] * dt_w, axis=1) * LOG2E                                      # (HB, KH)
    # token t's own key K + t (clamped: a plan built without checks may hand a corrupt pnat)
    q_key = tl.minimum(tl.maximum(K + q, 0), KH - 1)
    cq = tl.gather(c_w, tl.broadcast_to(q_key[None, :], (c_w.shape[0], TO)), 1)            # (HB, TO)

    b_rows = tl.where(is_new, B_rows + tok * s_tok_B, Bc_rows + ring_row * s_Bc_l)
    c_rows = C_rows + kk * s_tok_B
    cb = tl.zeros((KH, KH), tl.float32)
    for n0 in tl.range(0, BLOCK_N, CHUNK_N, num_stages=4):
        offs_c = n0 + tl.arange(0, CHUNK_N)
        c_ok = _cols_ok(offs_c, N, EVEN_N)
        Bw = tl.load(b_rows[:, None] + offs_c[None, :], mask=key_ok[:, None] & c_ok[None, :], other=0.0)
        C = tl.load(c_rows[:, None] + offs_c[None, :], mask=(kk < n_tok)[:, None] & c_ok[None, :], other=0.0)
        cb = dot16(C, tl.trans(Bw), cb, UPCAST)
        if append_B:
            tl.store(Bc_rows + (ring_row * s_Bc_l)[:, None] + offs_c[None, :], Bw,
                     mask=append[:, None] & c_ok[None, :])
    cb = tl.trans(_first_cols(tl.trans(cb), TO))                                               # (TO, KH)

    # keys up to the query's own (history keys all precede it); the select also drops dead keys
    live = key_ok[None, :] & (kk[None, :] <= (K + q)[:, None])                                 # (TO, KH)
    coef = tl.where(live[None, :, :], cb[None, :, :] * dt_w[:, None, :] * exp2(cq[:, :, None] - c_w[:, None, :]),
                    0.0)                                                                       # (HB, TO, KH)
    if HAS_D:
        coef += tl.where((kk[None, :] == (K + q)[:, None])[None, :, :], Dh[:, None, None], 0.0)
    _store_hi_lo(cf, coef)
    tl.store(v[:, None] + q[None, :], exp2(cq))
    tl.store(dtc_rows + ring_row[None, :], dt_w, mask=append[None, :])


@triton.jit
def coef_kernel(
    pnat_ptr, ring_start_ptr, order_ptr, slots_ptr, counts_ptr, cu_ptr, dt_ptr, dt_bias_ptr, A_ptr, D_ptr,
    B_ptr, C_ptr, Bc_ptr, dtc_ptr, coef_ptr, vec_ptr,
    batch, T, L, N, HPG,
    s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_cf_b, s_cf_h, s_v_b, s_v_h,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    WAIT: tl.constexpr, LAUNCH_DEPS: tl.constexpr, UPCAST: tl.constexpr,
    HB: tl.constexpr, EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr, TO: tl.constexpr,
):
    """Program (row, head block), queries t < TO (T <= TO). Write rows keep history keys and new tokens
    apart (`_apart_keys`), no-write rows put them on one window (`_window_keys`); both store every key
    position the mains read, in whole aligned 16-key blocks (vector stores, and no mask on keys in the
    mains keeps their loads in the software pipeline). Programs run over the StepPlan's entries: the
    write and no-write groups; the padding group between them (padding rows, rows with a faulted slot /
    pnat / ring_start) does no work."""
    entry = tl.program_id(0)
    h0 = tl.program_id(1) * HB
    if LAUNCH_DEPS:
        # the mains may launch now (their programs start while this grid finishes, then wait for it)
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
        heads = h0 + tl.arange(0, HB)
        g = h0 // HPG
        kk = tl.arange(0, KH)
        q = tl.arange(0, TO)
        # history: ring rows rs + k; a corrupt ring_start or pnat is masked off, never read outside the ring
        ring_row = wrap(rs + kk, L)
        hist = (kk < K) & (ring_row >= 0) & (ring_row < L)
        dtc_rows = dtc_ptr + slot * s_dtc_s + heads[:, None] * s_dtc_h                          # (HB, 1)
        dt_hist = tl.load(dtc_rows + ring_row[None, :], mask=hist[None, :], other=0.0)          # (HB, KH)
        A = tl.load(A_ptr + heads).to(tl.float32)
        bias = 0.0
        if HAS_BIAS:
            bias = tl.load(dt_bias_ptr + heads).to(tl.float32)
        Dh = 0.0
        if HAS_D:
            Dh = tl.load(D_ptr + heads).to(tl.float32)
        if WAIT:
            gdc_wait()      # dt, B, C of the new tokens come from the kernel before (conv1d)
        dt_rows = dt_ptr + row_off * s_dt_b + tok0 * s_dt_t + heads[:, None] * s_dt_h             # (HB, 1)
        B_rows = B_ptr + row_off * s_B_b + tok0 * s_B_t + g * s_B_g
        C_rows = C_ptr + row_off * s_B_b + tok0 * s_B_t + g * s_B_g
        Bc_rows = Bc_ptr + slot * s_Bc_s + g * s_Bc_g
        cf = coef_ptr + row * s_cf_b + heads[:, None, None] * s_cf_h + q[None, :, None] * NK + kk[None, None, :]
        v = vec_ptr + row * s_v_b + heads * s_v_h
        if entry < n_write:     # the plan's write group: the layout the write main reads
            new_row = wrap(rs + K + kk, L)
            new_ok = (kk < n_tok) & (new_row >= 0) & (new_row < L)
            _apart_keys(dt_rows, B_rows, C_rows, Bc_rows, dtc_rows, cf, v, K, n_tok, ring_row, hist, new_row, new_ok,
                        dt_hist, A, bias, Dh, N, s_dt_t, s_B_t, s_Bc_l, h0 % HPG == 0,
                        HAS_D, HAS_BIAS, SOFTPLUS, UPCAST, EVEN_N, BLOCK_N, CHUNK_N, TO)
        else:
            _window_keys(dt_rows, B_rows, C_rows, Bc_rows, dtc_rows, cf, v, K, n_tok, ring_row, hist, dt_hist, A,
                         bias, Dh, L, N, s_dt_t, s_B_t, s_Bc_l, h0 % HPG == 0,
                         HAS_D, HAS_BIAS, SOFTPLUS, UPCAST, EVEN_N, BLOCK_N, CHUNK_N, TO)
    elif WAIT:
        gdc_wait()      # a padding entry: nothing to do, but the grid must not finish before its producer
