"""The single-launch step (docs/design.md, "Kernels"): one program per (row, head, tile of BLOCK_P state rows) that
computes its own coefficients. Used where launch latency dominates (small batches, launch="dynamic")
and for the replay no-write form; from the tuning table's split_min_batch on, the split family
(coefficient kernel + write / no-write mains) takes over.

The program issues the state tile's load first, then puts the history (KH = 16 ring slots) and the new
tokens (TN = 8 or 16 slots) on one key axis, so every product is a tensor-core tile; the products are
computed transposed (state rows x tokens), so the state is the left operand in its stored layout:

    y      = exp(c_t)·(C·Sᵀ) + X_keys @ coef + D·x                 (rectangle form, no-write rows)
    h_K    = exp(Λ)·S + (X_keys·w) @ B_keys                          (write rows)

with c the running sum of A·dt over the key axis, coef the decayed B·C over visible keys (history:
all, new tokens: causal) and w the history's decay to the end of the history. Rows whose history
would overflow (pnat + len > W) store h_K; the others leave the state bit-identical. The replay form
(materialize h_K, then y = exp(c_t − Λ)·(C·h_Kᵀ) + new-token terms) is kept selectable.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from specssm.step.device import dot16, row_tokens, silu, softplus, tile_masks, wrap
from specssm.step.store import codes_to_half, decode_state_tile, store_state_tile

DYNAMIC, WRITE, NO_WRITE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _state_tile(st_desc, coords, st_base, st_off, st_mask, TMA: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, AGAIN: tl.constexpr):
    """The program's (BLOCK_P, BLOCK_N) state tile as stored: by TMA through the pool's descriptor
    (slots, H, P, N) at coords (zero-filled past P and N), or by pointer. AGAIN: a second read, which
    must not be merged with the first into one copy held in registers."""
    if TMA:
        S = tl.reshape(st_desc.load(coords), (BLOCK_P, BLOCK_N))
    else:
        S = tl.load(st_base + st_off, mask=st_mask, other=0.0, volatile=AGAIN)
    return S


@triton.jit
def _fold(S, S_scale, Xf, Keys, w_fold, hist_ok, lam, KIND: tl.constexpr, DOT_PREC: tl.constexpr):
    """h_K = exp(Λ)·S + Σ_k exp(Λ − c_k)·dt_k · x_k ⊗ B_k: the checkpoint with the history folded in
    (w_fold holds exp(Λ − c_k)·dt_k on history keys). The new keys are zeroed on both sides, not just
    weighted 0: a NaN or Inf among the new tokens must not reach the checkpoint (0·Inf is NaN). S is the
    state tile read again (from L2, or from shared memory after TMA): holding the first copy in
    registers through the whole program would cost 64 registers per thread and half the write launch's
    occupancy."""
    return tl.dot(tl.where(hist_ok[None, :], Xf * w_fold[None, :], 0.0),
                  tl.where(hist_ok[:, None], Keys.to(tl.float32), 0.0),
                  acc=tl.exp(lam) * decode_state_tile(S, S_scale, KIND), input_precision=DOT_PREC)


@triton.jit
def _record_fault(faults_ptr, row, field, value):
    """Fold (row, field, value) into the fault record (specssm/cache/faults.py): an atomic min."""
    key = (row.to(tl.int64) << 36) | (tl.full((), field, tl.int64) << 32) | (value.to(tl.int64) & 0xFFFFFFFF)
    tl.atomic_min(faults_ptr, key)


@triton.jit
def _shares_slot(sbi_ptr, row, slot, batch, BLOCK: tl.constexpr):
    """Whether another row of the step names `slot` (a valid id, so never a padding row's): their steps
    would race on it. One vector load per BLOCK rows; the fused launch serves small batches."""
    hits = 0
    n_scan = tl.where(batch > 1, batch, 0)      # a single row shares with nobody: no load
    for r0 in range(0, n_scan, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        ids = tl.load(sbi_ptr + r, mask=r < batch, other=-1).to(tl.int64)
        hits += tl.sum(((ids == slot) & (r != row) & (r < batch)).to(tl.int32))
    return hits > 0


@triton.jit
def fused_kernel(
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
    sbi_ptr, cu_ptr, order_ptr, slots_ptr, counts_ptr, seed_ptr, st_desc,
    batch, T, W, L, pad_slot_id, num_slots, max_pnat, faults_ptr, H, P, N, HPG, NPT,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, HAS_SBI: tl.constexpr,
    USE_ORDER: tl.constexpr, EVEN_TILE: tl.constexpr, TMA: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr,
    SR_ROWS: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KH: tl.constexpr, TN: tl.constexpr, NK: tl.constexpr,
    DOT_PREC: tl.constexpr, NATIVE_CS: tl.constexpr, PDL: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program: one row, one head, one tile of BLOCK_P state rows (all N columns).

    Everything is transposed, (state rows, tokens), so the state tile is the left operand of its
    products in its stored (N-contiguous) layout. The state load is issued first: it is the only large
    read, and everything else (slot metadata, ring rows, coefficients) overlaps with it."""
    pid = tl.program_id(0)
    h = pid % H
    pt = (pid // H) % NPT
    row_i = pid // (H * NPT)
    if USE_ORDER:
        # the plan's entry of this program (write rows from the front, no-write rows from the end),
        # loaded together with the counts: the slot comes with the row
        entry = row_i if BRANCH == WRITE else batch - 1 - row_i
        row = tl.load(order_ptr + entry)
        slot = tl.load(slots_ptr + entry).to(tl.int64)
        if BRANCH == WRITE:
            n_rows = tl.load(counts_ptr)
        else:
            n_rows = tl.load(counts_ptr + 1) - tl.load(counts_ptr)
    else:
        row = row_i
        n_rows = batch
        if HAS_SBI:
            slot = tl.load(sbi_ptr + row).to(tl.int64)
        else:
            slot = row.to(tl.int64)
    if row_i < n_rows:
        if (slot != pad_slot_id) & (slot >= 0) & (slot < num_slots):
            offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
            offs_n = tl.arange(0, BLOCK_N)
            p_ok, n_ok = tile_masks(offs_p, offs_n, P, N, EVEN_TILE)
            # 64-bit scalar bases, 32-bit offsets inside the tile: fewer registers per element
            st_pool = slot * s_st_s + h * s_st_h
            st_base = state_ptr + st_pool
            sc_base = scale_ptr + slot * s_sc_s + h * s_sc_h
            st_row = offs_p * s_st_p
            st_off = st_row[:, None] + offs_n[None, :]
            st_mask = p_ok[:, None] & n_ok[None, :]
            st_coords = [slot.to(tl.int32), h, pt * BLOCK_P, 0]
            S_raw = _state_tile(st_desc, st_coords, st_base, st_off, st_mask, TMA, BLOCK_P, BLOCK_N, False)
            if KIND >= 3:
                S_scale = tl.load(sc_base + offs_p, mask=p_ok, other=0.0)
            else:
                S_scale = 1.0
            K = tl.load(pnat_ptr + slot)
            rs = tl.load(ring_start_ptr + slot)
            # a pnat or ring_start outside the contract: the row stores nothing and records a fault
            pnat_ok = (K >= 0) & (K <= max_pnat)
            ok = pnat_ok & (rs >= 0) & (rs < L)
            if not ok:
                _record_fault(faults_ptr, row, tl.where(pnat_ok, 3, 2), tl.where(pnat_ok, rs, K))
            if (BRANCH == DYNAMIC) and HAS_SBI:
                # rows sharing a slot do nothing (a plan sets them aside as padding; this launch has none)
                shared = _shares_slot(sbi_ptr, row, slot, batch, 64)
                if shared & ok:
                    _record_fault(faults_ptr, row, 8, slot)
                ok = ok & ~shared
            tok0, n_tok, row_off = row_tokens(cu_ptr, row, T, VARLEN)
            if BRANCH == DYNAMIC:
                do_write = (K + n_tok > W) & ok
            else:
                do_write = (BRANCH == WRITE) & ok
            g = h // HPG
            # one key axis: KH history slots (ring rows rs + k), then TN new-token slots, padded to NK (a
            # power of two; padding keys are masked like the new tokens past n_tok)
            jk = tl.arange(0, NK)
            jn = tl.arange(0, TN)
            is_hist = jk < KH
            j_new = jk - KH
            t_ok = jn < n_tok
            # ring rows: ring_start < L and pnat + T <= L keep every live index below 2L; a corrupt
            # ring_start or pnat is masked off, never read or written outside the slot's ring
            ring_row = wrap(rs + jk, L)
            hist_ok = is_hist & (jk < K) & (ring_row >= 0) & (ring_row < L)
            key_ok = hist_ok | (~is_hist & (j_new < n_tok))
            key_tok = tok0 + tl.where(is_hist, 0, j_new)
            tok = tok0 + jn
            xc_base = xc_ptr + slot * s_xc_s + h * s_xc_h
            Bc_base = Bc_ptr + slot * s_Bc_s + g * s_Bc_g
            x_base = x_ptr + row_off * s_x_b + h * s_x_h
            B_base = B_ptr + row_off * s_B_b + g * s_B_g
            dt_hist = tl.load(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + ring_row, mask=hist_ok, other=0.0)
            if PDL:
                # the new tokens' inputs come from the kernel launched before this one (conv1d)
                gdc_wait()
            # keys (B of history and new tokens) and values (x), each in one load from two sources
            Keys = tl.load(tl.where(is_hist, Bc_base + ring_row * s_Bc_l, B_base + key_tok * s_B_t)[:, None]
                           + offs_n[None, :], mask=key_ok[:, None] & n_ok[None, :], other=0.0)   # (NK, BLOCK_N)
            X_all = tl.load(tl.where(is_hist, xc_base + ring_row * s_xc_l, x_base + key_tok * s_x_t)[None, :]
                            + offs_p[:, None], mask=p_ok[:, None] & key_ok[None, :], other=0.0)  # (BLOCK_P, NK)
            X_new = tl.load(x_base + tok[None, :] * s_x_t + offs_p[:, None],
                            mask=p_ok[:, None] & t_ok[None, :], other=0.0)                      # (BLOCK_P, TN)
            Ct = tl.load(C_ptr + row_off * s_B_b + g * s_B_g + tok[None, :] * s_B_t + offs_n[:, None],
                         mask=n_ok[:, None] & t_ok[None, :], other=0.0)                         # (BLOCK_N, TN)
            dt_raw = tl.load(dt_ptr + row_off * s_dt_b + key_tok * s_dt_t + h * s_dt_h,
                             mask=~is_hist & key_ok, other=0.0).to(tl.float32)

            # decays: c over the key axis (history, then new tokens); Λ = c at the end of the history
            A = tl.load(A_ptr + h).to(tl.float32)
            if HAS_BIAS:
                dt_raw += tl.load(dt_bias_ptr + h).to(tl.float32)
            if SOFTPLUS:
                dt_raw = softplus(dt_raw)
            dt_key = tl.where(is_hist, dt_hist, tl.where(key_ok, dt_raw, 0.0))
            c_key = tl.cumsum(A * dt_key, axis=0)
            lam = tl.sum(tl.where(is_hist, A * dt_key, 0.0), axis=0)
            # the queries' c is the new keys' (the same sums, so the diagonal decays are exactly 1)
            pick = jk[None, :] == (jn + KH)[:, None]
            c_new = tl.sum(tl.where(pick, c_key[None, :], 0.0), axis=1)

            # Bᵀ·C over the keys (16-bit operands give exact products), decayed and masked
            cbT = dot16(Keys, Ct, tl.zeros((NK, TN), tl.float32), UPCAST)                    # (NK, TN)
            vis = (~is_hist[:, None] & (j_new[:, None] <= jn[None, :])) & t_ok[None, :]
            if RECT:
                vis = vis | (hist_ok[:, None] & t_ok[None, :])
            coef = cbT * tl.exp(tl.where(vis & key_ok[:, None], c_new[None, :] - c_key[:, None], float("-inf")))
            Xf = X_all.to(tl.float32)
            y = tl.dot(Xf, coef * dt_key[:, None], input_precision=DOT_PREC)                # (BLOCK_P, TN)
            Xnf = X_new.to(tl.float32)
            # the fold's weights: x_k decayed to the end of the history (history keys only)
            w_fold = tl.where(hist_ok, tl.exp(lam - c_key) * dt_key, 0.0)
            if RECT:
                if NATIVE_CS:
                    # 16-bit state, or 8-bit codes (exact in 16 bits): the row scale applies after the sum
                    if KIND == 3:       # int8 codes from packed bytes, exact in 16 bits
                        cs = dot16(codes_to_half(S_raw, Ct.dtype), Ct, tl.zeros((BLOCK_P, TN), tl.float32), UPCAST)
                    else:
                        cs = dot16(S_raw.to(Ct.dtype), Ct, tl.zeros((BLOCK_P, TN), tl.float32), UPCAST)
                    if KIND >= 3:
                        cs = cs * S_scale[:, None]
                else:
                    cs = tl.dot(decode_state_tile(S_raw, S_scale, KIND), Ct.to(tl.float32),
                                input_precision=DOT_PREC)
                y += tl.exp(c_new)[None, :] * cs
                if do_write:
                    hK = _fold(_state_tile(st_desc, st_coords, st_base, st_off, st_mask, TMA, BLOCK_P, BLOCK_N, True),
                               S_scale, Xf, Keys, w_fold, hist_ok, lam, KIND, DOT_PREC)
                    store_state_tile(hK, st_base, sc_base, st_off, st_row, st_mask, offs_p, p_ok, seed_ptr, slot,
                                     st_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
            else:
                # replay: materialize h_K, then y from it
                hK = _fold(_state_tile(st_desc, st_coords, st_base, st_off, st_mask, TMA, BLOCK_P, BLOCK_N, True),
                           S_scale, Xf, Keys, w_fold, hist_ok, lam, KIND, DOT_PREC)
                y += tl.exp(c_new - lam)[None, :] * tl.dot(hK, Ct.to(tl.float32), input_precision=DOT_PREC)
                if do_write:
                    store_state_tile(hK, st_base, sc_base, st_off, st_row, st_mask, offs_p, p_ok, seed_ptr, slot,
                                     st_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
            if HAS_D:
                y += tl.load(D_ptr + h).to(tl.float32) * Xnf
            io_mask = p_ok[:, None] & t_ok[None, :] & ok
            if HAS_Z:
                zt = tl.load(z_ptr + row_off * s_z_b + tok[None, :] * s_z_t + h * s_z_h + offs_p[:, None],
                             mask=io_mask, other=0.0).to(tl.float32)
                y = y * silu(zt)
            tl.store(out_ptr + row_off * s_o_b + tok[None, :] * s_o_t + h * s_o_h + offs_p[:, None],
                     y.to(out_ptr.dtype.element_ty), mask=io_mask)

            # ring appends of the new keys, disjoint from the history rows read above (pnat + T <= L)
            new_ring_row = wrap(rs + K + j_new, L)
            new_ok = ~is_hist & key_ok & (new_ring_row >= 0) & (new_ring_row < L) & ok
            tl.store(xc_base + new_ring_row[None, :] * s_xc_l + offs_p[:, None], X_all,
                     mask=p_ok[:, None] & new_ok[None, :])
            if pt == 0:
                tl.store(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + new_ring_row, dt_key, mask=new_ok)
                if h % HPG == 0:
                    tl.store(Bc_base + new_ring_row[:, None] * s_Bc_l + offs_n[None, :], Keys,
                             mask=new_ok[:, None] & n_ok[None, :])
        else:
            if slot != pad_slot_id:
                _record_fault(faults_ptr, row, 1, slot)
            if PDL:
                gdc_wait()      # padding row: nothing to do, but the launch must not finish before its producer
    elif PDL:
        gdc_wait()          # past the plan's count: likewise
