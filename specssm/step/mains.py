"""The main kernels of the split step: persistent loops over state tiles, one launch per branch.

A tile is BLOCK_P state rows x N of one (row, head). Everything is transposed, (state rows, tokens), so
the state tile is the left operand of its products in its stored layout. Per tile, with the row's
coefficients from the coefficient kernel (specssm/step/coef.py):

    y   = exp(c_t)·(C·Sᵀ) + X_keys @ coef                      (rectangle form; D·x is in coef)
    h_K = exp(Λ)·S + (X_hist·w) @ B_hist                        (write rows only, stored rounded)

No-write rows put history and new tokens on one window of KH keys; write rows keep history keys and
new tokens apart (KH each). The x·coef and fold products take 16-bit operands, the fp32 factor as a
(hi, lo) pair: nearly fp32 at the cost of a second 16-bit product. The loop is software-pipelined
(`num_stages`): the next tile's state is in flight while this one computes.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from specssm.step.coef import KH, NK
from specssm.step.device import dot16, row_tokens, silu, tile_masks, wrap
from specssm.step.fold import fold_history
from specssm.step.store import codes_to_f32, codes_to_half, encode_state_tile, store_state_tile


@triton.jit
def _cs_product(C, S, KIND: tl.constexpr, CS16: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """C @ Sᵀ for a (BLOCK_P, BLOCK_N) state tile as stored, unscaled: 16-bit operands where exact (a
    state in C's dtype, 8-bit codes), else the fp32 tile (decoded codes) in DOT_PREC."""
    zero = tl.zeros((C.shape[0], S.shape[0]), tl.float32)
    if CS16:
        if KIND == 3:
            cs = dot16(C, tl.trans(codes_to_half(S, C.dtype)), zero, UPCAST)
        else:
            cs = dot16(C, tl.trans(S.to(C.dtype)), zero, UPCAST)
    else:
        cs = tl.dot(C.to(tl.float32), tl.trans(codes_to_f32(S, KIND)), acc=zero,
                    input_precision=DOT_PREC)
    return cs


@triton.jit
def _top_rows(y, TO: tl.constexpr):
    """The first TO rows of a (TM, BLOCK_P) product tile: TO = TM keeps it whole; TO = TM / 2 takes the
    rows one register half of the tensor-core accumulator holds (no data movement)."""
    if TO == y.shape[0]:
        out = y
    else:
        tl.static_assert(2 * TO == y.shape[0], "_top_rows: TO must be TM or TM / 2")
        out, _ = tl.split(tl.permute(tl.reshape(y, (2, TO, y.shape[1])), (1, 2, 0)))
    return out


@triton.jit
def _coef_x(coef_base, X, acc, n_tok, KEY0: tl.constexpr, UPCAST: tl.constexpr, TM: tl.constexpr):
    """acc + coef[:, KEY0:KEY0 + KH] @ X over the (hi, lo) parts: X (KH, BLOCK_P) 16-bit. Only the row's
    tokens are in the scratch (the other rows read as zeros); a mask on keys here would take these loads
    out of the software pipeline (the coefficient kernel writes every key position instead)."""
    kk = tl.arange(0, KH)
    t = tl.arange(0, TM)
    off = t[:, None] * NK + (kk + KEY0)[None, :]
    mask = (t < n_tok)[:, None]
    acc = dot16(tl.load(coef_base + off, mask=mask, other=0.0), X, acc, UPCAST)
    return dot16(tl.load(coef_base + TM * NK + off, mask=mask, other=0.0), X, acc, UPCAST)


@triton.jit
def _write_halves(state_ptr, st_desc, seed_ptr, slot, h, pt, st_pool, st_row, p_ok, Bh_rows, hist, C_rows, t_ok, Xh,
                  w_fold, decay_fold, N, KIND: tl.constexpr, CS16: tl.constexpr, SR: tl.constexpr,
                  SR_ROWS: tl.constexpr, PHILOX_ROUNDS: tl.constexpr, TMA: tl.constexpr, DOT_PREC: tl.constexpr,
                  UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, TM: tl.constexpr,
                  TO: tl.constexpr):
    """A write tile of an unscaled state (no row amax) in two column halves: per half, the state, B_hist
    and C columns, C·Sᵀ accumulated, the fold, rounded and stored (SR bits keyed by the same element
    offsets as a whole tile's). Returns the tile's C·Sᵀ (TO, BLOCK_P)."""
    HALF: tl.constexpr = BLOCK_N // 2
    cs = tl.zeros((TM, BLOCK_P), tl.float32)
    for c in tl.static_range(2):
        offs_c = c * HALF + tl.arange(0, HALF)
        c_ok = offs_c < N
        mask = p_ok[:, None] & c_ok[None, :]
        off = st_row[:, None] + offs_c[None, :]
        if TMA:
            S = tl.reshape(st_desc.load([slot.to(tl.int32), h, pt * BLOCK_P, c * HALF]), (BLOCK_P, HALF))
        else:
            S = tl.load(state_ptr + st_pool + off, mask=mask, other=0.0)
        C = tl.load(C_rows[:, None] + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        cs += _cs_product(C, S, KIND, CS16, DOT_PREC, UPCAST)
        Bh = tl.load(Bh_rows[:, None] + offs_c[None, :], mask=hist[:, None] & c_ok[None, :], other=0.0)
        hK = fold_history(S, 1.0, Xh, Bh, w_fold, decay_fold, KIND, UPCAST)
        q, _ = encode_state_tile(hK, mask, seed_ptr, slot, st_pool + st_row + c * HALF, st_pool + off,
                                 state_ptr.dtype.element_ty, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
        if TMA:
            st_desc.store([slot.to(tl.int32), h, pt * BLOCK_P, c * HALF], tl.reshape(q, (1, 1, BLOCK_P, HALF)))
        else:
            tl.store(state_ptr + st_pool + off, q, mask=mask)
    return _top_rows(cs, TO)


@triton.jit
def _prefetch_tile(tile, n_tiles, state_ptr, slots_ptr, batch, s_st_s, s_st_h, s_st_p, H: tl.constexpr,
                   NPT: tl.constexpr, P: tl.constexpr, N: tl.constexpr, WRITE: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """Ask L2 for a tile's state (one prefetch per 128-byte line of its rows, N contiguous), where the
    loop will load it; every address inside the tile's slot and head."""
    if tile < n_tiles:
        EB: tl.constexpr = state_ptr.dtype.element_ty.primitive_bitwidth // 8
        LINE: tl.constexpr = 128 // EB                      # elements per 128-byte line
        LINES: tl.constexpr = (BLOCK_N + LINE - 1) // LINE
        h = tile % H
        pt = (tile // H) % NPT
        e = tile // (H * NPT)
        entry = e if WRITE else batch - 1 - e
        slot = tl.load(slots_ptr + entry).to(tl.int64)
        rows = tl.minimum(pt * BLOCK_P + tl.arange(0, BLOCK_P), P - 1)
        lines = tl.minimum(tl.arange(0, LINES) * LINE, N - 1)
        ptrs = state_ptr + slot * s_st_s + h * s_st_h + rows[:, None] * s_st_p + lines[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def main_kernel(
    state_ptr, st_desc, scale_ptr, xc_ptr, Bc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, C_ptr, out_ptr, z_ptr, coef_ptr, vec_ptr, order_ptr, slots_ptr, counts_ptr, cu_ptr, seed_ptr,
    batch, T, L, n_progs,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h, s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l,
    s_x_b, s_x_t, s_x_h, s_C_b, s_C_t, s_C_g, s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    s_cf_b, s_cf_h, s_v_b, s_v_h,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, HPG: tl.constexpr,
    WRITE: tl.constexpr, HAS_Z: tl.constexpr, VARLEN: tl.constexpr,
    KIND: tl.constexpr, CS16: tl.constexpr, SR: tl.constexpr, SR_ROWS: tl.constexpr,
    PHILOX_ROUNDS: tl.constexpr, TMA: tl.constexpr, PDL: tl.constexpr, LAUNCH_DEPS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, TM: tl.constexpr, TO: tl.constexpr, STAGES: tl.constexpr,
    COL_SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Persistent: program pid takes tiles pid, pid + n_progs, ... of this launch's rows, which come
    from the StepPlan: write rows from the front of `order`, no-write rows from its end (padding rows
    sit between them and are never visited). Tokens are the products' M side (TM = 16 rows); the
    epilogue (decays, gate, stores) runs on the first TO rows (T <= TO). COL_SPLIT = 2 (write tiles of
    the unscaled kinds, which need no whole-row amax): the state columns in two halves, each loaded,
    multiplied with C, folded, rounded and stored before the next (half the fold's live registers).
    PREFETCH (a GPU, under PDL): before waiting for the coefficient kernel, the program's first STAGES
    tiles' state is requested into L2, which the pipelined loop then reads after the wait."""
    NPT: tl.constexpr = (P + BLOCK_P - 1) // BLOCK_P
    SPLIT: tl.constexpr = WRITE and COL_SPLIT > 1
    tl.static_assert(not SPLIT or (COL_SPLIT == 2 and KIND < 3), "main_kernel: COL_SPLIT 2, unscaled kinds")
    EVEN_TILE: tl.constexpr = (P % BLOCK_P == 0) and (N == BLOCK_N)
    pid = tl.program_id(0)
    if LAUNCH_DEPS:
        gdc_launch_dependents()     # the next main may launch (it waits for this grid)
    if WRITE:
        n_rows = tl.load(counts_ptr)
    else:
        n_rows = tl.load(counts_ptr + 1) - tl.load(counts_ptr)
    n_tiles = n_rows * (NPT * H)
    offs_n = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, KH)
    t = tl.arange(0, TM)
    to = tl.arange(0, TO)
    if PDL:
        if PREFETCH:
            for i in tl.static_range(STAGES):
                _prefetch_tile(pid + i * n_progs, n_tiles, state_ptr, slots_ptr, batch, s_st_s, s_st_h, s_st_p,
                               H, NPT, P, N, WRITE, BLOCK_P, BLOCK_N)
        # before the loop, not inside it: the software pipeline issues the first tiles' loads (C, the
        # coefficients) in its prologue, ahead of any wait in the loop body
        gdc_wait()      # the coefficient kernel's outputs (and conv1d's, before it)
    for tile in tl.range(pid, n_tiles, n_progs, num_stages=STAGES):
        h = tile % H
        rest = tile // H
        pt = rest % NPT
        e = rest // NPT
        entry = e if WRITE else batch - 1 - e
        row = tl.load(order_ptr + entry)
        slot = tl.load(slots_ptr + entry).to(tl.int64)
        K = tl.load(pnat_ptr + slot)
        rs = tl.load(ring_start_ptr + slot)
        tok0, n_tok, row_off = row_tokens(cu_ptr, row, T, VARLEN)
        offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok, n_ok = tile_masks(offs_p, offs_n, P, N, EVEN_TILE)
        st_pool = slot * s_st_s + h * s_st_h
        st_row = offs_p * s_st_p
        st_off = st_row[:, None] + offs_n[None, :]
        st_mask = p_ok[:, None] & n_ok[None, :]
        if not SPLIT:
            if TMA:
                S = tl.reshape(st_desc.load([slot.to(tl.int32), h, pt * BLOCK_P, 0]), (BLOCK_P, BLOCK_N))
            else:
                S = tl.load(state_ptr + st_pool + st_off, mask=st_mask, other=0.0)
        sc_base = scale_ptr + slot * s_sc_s + h * s_sc_h
        if KIND >= 3:
            S_scale = tl.load(sc_base + offs_p, mask=p_ok, other=0.0)
        else:
            S_scale = 1.0
        g = h // HPG
        t_ok = t < n_tok
        ring_row = wrap(rs + kk, L)
        hist = (kk < K) & (ring_row >= 0) & (ring_row < L)
        xc_base = xc_ptr + slot * s_xc_s + h * s_xc_h
        x_base = x_ptr + row_off * s_x_b + h * s_x_h
        if WRITE:
            Xh = tl.load(xc_base + ring_row[:, None] * s_xc_l + offs_p[None, :],
                         mask=hist[:, None] & p_ok[None, :], other=0.0)                        # (KH, BLOCK_P)
            Bh_rows = Bc_ptr + slot * s_Bc_s + g * s_Bc_g + ring_row * s_Bc_l
            if not SPLIT:
                Bh = tl.load(Bh_rows[:, None] + offs_n[None, :], mask=hist[:, None] & n_ok[None, :], other=0.0)
        else:
            # one window: history keys k < K, then the new tokens at K + s
            s_new = kk - K
            new = (s_new >= 0) & (s_new < n_tok)
            Xh = tl.load(tl.where(hist, xc_base + ring_row * s_xc_l, x_base + (tok0 + s_new) * s_x_t)[:, None]
                         + offs_p[None, :], mask=(hist | new)[:, None] & p_ok[None, :], other=0.0)
        C_rows = C_ptr + row_off * s_C_b + (tok0 + t) * s_C_t + g * s_C_g
        if not SPLIT:
            C = tl.load(C_rows[:, None] + offs_n[None, :], mask=t_ok[:, None] & n_ok[None, :], other=0.0)
            cs = _top_rows(_cs_product(C, S, KIND, CS16, DOT_PREC, UPCAST), TO)
        v_base = vec_ptr + row * s_v_b + h * s_v_h
        cf_base = coef_ptr + row * s_cf_b + h * s_cf_h
        y = _coef_x(cf_base, Xh, tl.zeros((TM, BLOCK_P), tl.float32), n_tok, 0, UPCAST, TM)
        if WRITE:
            Xn = tl.load(x_base + (tok0 + kk)[:, None] * s_x_t + offs_p[None, :],
                         mask=(kk < n_tok)[:, None] & p_ok[None, :], other=0.0)                # (KH, BLOCK_P)
            y = _coef_x(cf_base, Xn, y, n_tok, KH, UPCAST, TM)
            # fold: h_K = exp(Λ)·S + (X_hist·w)ᵀ @ B_hist (weights and exp(Λ) from the coefficient kernel)
            w_fold = tl.load(v_base + KH + kk)
            decay_fold = tl.load(v_base + 2 * KH)
            if SPLIT:
                cs = _write_halves(state_ptr, st_desc, seed_ptr, slot, h, pt, st_pool, st_row, p_ok, Bh_rows, hist,
                                   C_rows, t_ok, Xh, w_fold, decay_fold, N, KIND, CS16, SR, SR_ROWS, PHILOX_ROUNDS,
                                   TMA, DOT_PREC, UPCAST, BLOCK_P, BLOCK_N, TM, TO)
            else:
                hK = fold_history(S, S_scale, Xh, Bh, w_fold, decay_fold, KIND, UPCAST)
                if TMA:
                    q, scale = encode_state_tile(hK, st_mask, seed_ptr, slot, st_pool + st_row, st_pool + st_off,
                                                 state_ptr.dtype.element_ty, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
                    st_desc.store([slot.to(tl.int32), h, pt * BLOCK_P, 0], tl.reshape(q, (1, 1, BLOCK_P, BLOCK_N)))
                    if KIND >= 3:
                        tl.store(sc_base + offs_p, scale, mask=p_ok)
                else:
                    store_state_tile(hK, state_ptr + st_pool, sc_base, st_off, st_row, st_mask, offs_p, p_ok,
                                     seed_ptr, slot, st_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
            new_row = wrap(rs + K + kk, L)
            new_ok = (kk < n_tok) & (new_row >= 0) & (new_row < L)
            tl.store(xc_base + new_row[:, None] * s_xc_l + offs_p[None, :], Xn, mask=new_ok[:, None] & p_ok[None, :])
        else:
            tl.store(xc_base + ring_row[:, None] * s_xc_l + offs_p[None, :], Xh,
                     mask=(new & (ring_row >= 0) & (ring_row < L))[:, None] & p_ok[None, :])
        decay = tl.load(v_base + to, mask=to < n_tok, other=0.0)
        if KIND >= 3:
            y = _top_rows(y, TO) + cs * decay[:, None] * S_scale[None, :]
        else:
            y = _top_rows(y, TO) + cs * decay[:, None]
        io_mask = (to < n_tok)[:, None] & p_ok[None, :]
        if HAS_Z:
            zt = tl.load(z_ptr + row_off * s_z_b + (tok0 + to)[:, None] * s_z_t + h * s_z_h + offs_p[None, :],
                         mask=io_mask, other=0.0).to(tl.float32)
            y = y * silu(zt)
        tl.store(out_ptr + row_off * s_o_b + (tok0 + to)[:, None] * s_o_t + h * s_o_h + offs_p[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=io_mask)
