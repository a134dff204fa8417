"""Checkpointing replay: the SSM state update of one verify step on the ring contract (DESIGN §3–§5).

One program handles one row, one head and one tile of BLOCK_P whole state rows. It issues the state
tile's load first, then puts the history (KH = 16 ring slots) and the new tokens (TN = 8 or 16 slots:
T padded to the tuning table's TN_MIN) on one key axis, so every product is a tensor-core tile; the
products are computed transposed (state rows x tokens), so the state is the left operand in its stored
layout:

    y      = exp(c_t)·(C·Sᵀ) + X_keys @ coef + D·x                 (rectangle form, no-write rows)
    h_K    = exp(Λ)·S + (X_keys·w) @ B_keys                          (write rows)

with c the running sum of A·dt over the key axis, coef the decayed B·C over visible keys (history:
all, new tokens: causal) and w the history's decay to the end of the history. Rows whose history
would overflow (pnat + len > W) store h_K; the others leave the state bit-identical. The replay form
(materialize h_K, then y = exp(c_t − Λ)·(C·h_Kᵀ) + new-token terms) is kept selectable.

Launch modes: "dynamic" (one launch, each row branches on its own flush test), "split" (two launches
over the write-first StepPlan, each compiled for one branch; programs past the plan's count exit).
Baselines live in specssm/ops/baselines.py; why the kernel looks like this: docs/performance.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from specssm._checks import MAX_WINDOW, check_kernel_layout, check_ssu_args, check_tensor
from specssm._runtime import interpreting, pdl_supported
from specssm.cache.plan import StepPlan
from specssm.ops import tuning
from specssm.ops.store import STATE_KIND, codes_to_half, decode_state_tile, store_state_tile
from specssm.quant.rounding import COMPILED

DYNAMIC, WRITE, NO_WRITE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _softplus(v):
    # log(1 + exp(v)) loses all digits for v << 0 in fp32; exp(v) is exact to first order there
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def _silu(v):
    """v·sigmoid(v). Compiled: one ex2 and one rcp (the approximate MUFU ops, ~2 ulp) where
    `v * tl.sigmoid(v)` spends ~14 instructions per element on range fixups of exp and the division;
    the products are rounded to the activations' 16 bits after this (or compared at fp32 tolerance).
    The interpreter, which has no inline PTX, takes the plain formula."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 t, t; mul.f32 $0, $1, t; }",
            "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    return v * tl.sigmoid(v)


@triton.jit
def _wrap(i, L):
    """i mod L for 0 <= i < 2L: one conditional subtraction where `%` by a runtime L costs an integer
    division per element (~20 instructions, on every program's path to its history loads)."""
    return tl.where(i >= L, i - L, i)


@triton.jit
def _dot16(a, b, UPCAST: tl.constexpr):
    """a @ b on 16-bit operands, fp32 accumulation (products of 16-bit floats are exact in fp32).
    UPCAST (the CPU interpreter, whose bf16 dot is wrong) computes the same products in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


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
def _fold(S, S_scale, Xf, Keys, w_fold, lam, KIND: tl.constexpr, DOT_PREC: tl.constexpr):
    """h_K = exp(Λ)·S + Σ_k exp(Λ − c_k)·dt_k · x_k ⊗ B_k: the checkpoint with the history folded in
    (w_fold holds exp(Λ − c_k)·dt_k on history keys, 0 on new ones). S is the state tile read again
    (from L2, or from shared memory after TMA): holding the first copy in registers through the whole
    program would cost 64 registers per thread and half the write launch's occupancy."""
    return tl.dot(Xf * w_fold[None, :], Keys.to(tl.float32),
                  acc=tl.exp(lam) * decode_state_tile(S, S_scale, KIND), input_precision=DOT_PREC)


@triton.jit
def _ssu_kernel(
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
    sbi_ptr, cu_ptr, order_ptr, slots_ptr, counts_ptr, seed_ptr, st_desc,
    batch, T, W, L, pad_slot_id, H, P, N, HPG, NPT,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, HAS_SBI: tl.constexpr,
    USE_ORDER: tl.constexpr, EVEN_TILE: tl.constexpr, TMA: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr, SR_ROWS: tl.constexpr,
    PHILOX_ROUNDS: tl.constexpr,
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
        if slot != pad_slot_id:
            offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
            offs_n = tl.arange(0, BLOCK_N)
            if EVEN_TILE:
                # tiles cover P and N exactly: constant-true masks, which the compiler drops from every
                # access to the state tile (a predicate per element otherwise)
                p_ok = tl.full((BLOCK_P,), 1, tl.int1)
                n_ok = tl.full((BLOCK_N,), 1, tl.int1)
            else:
                p_ok = offs_p < P
                n_ok = offs_n < N
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
            if VARLEN:
                tok0 = tl.load(cu_ptr + row).to(tl.int64)
                n_tok = (tl.load(cu_ptr + row + 1) - tok0).to(tl.int32)
                row_off = 0
            else:
                tok0 = 0
                n_tok = T
                row_off = row.to(tl.int64)
            if BRANCH == DYNAMIC:
                do_write = K + n_tok > W
            else:
                do_write = BRANCH == WRITE
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
            ring_row = _wrap(rs + jk, L)
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
                dt_raw = _softplus(dt_raw)
            dt_key = tl.where(is_hist, dt_hist, tl.where(key_ok, dt_raw, 0.0))
            c_key = tl.cumsum(A * dt_key, axis=0)
            lam = tl.sum(tl.where(is_hist, A * dt_key, 0.0), axis=0)
            # the queries' c is the new keys' (the same sums, so the diagonal decays are exactly 1)
            pick = jk[None, :] == (jn + KH)[:, None]
            c_new = tl.sum(tl.where(pick, c_key[None, :], 0.0), axis=1)

            # Bᵀ·C over the keys (16-bit operands give exact products), decayed and masked
            cbT = _dot16(Keys, Ct, UPCAST)                                                   # (NK, TN)
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
                        cs = _dot16(codes_to_half(S_raw, Ct.dtype), Ct, UPCAST)
                    else:
                        cs = _dot16(S_raw.to(Ct.dtype), Ct, UPCAST)
                    if KIND >= 3:
                        cs = cs * S_scale[:, None]
                else:
                    cs = tl.dot(decode_state_tile(S_raw, S_scale, KIND), Ct.to(tl.float32),
                                input_precision=DOT_PREC)
                y += tl.exp(c_new)[None, :] * cs
                if do_write:
                    hK = _fold(_state_tile(st_desc, st_coords, st_base, st_off, st_mask, TMA, BLOCK_P, BLOCK_N, True),
                               S_scale, Xf, Keys, w_fold, lam, KIND, DOT_PREC)
                    store_state_tile(hK, st_base, sc_base, st_off, st_row, st_mask, offs_p, p_ok, seed_ptr, slot,
                                     st_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
            else:
                # replay: materialize h_K, then y from it
                hK = _fold(_state_tile(st_desc, st_coords, st_base, st_off, st_mask, TMA, BLOCK_P, BLOCK_N, True),
                           S_scale, Xf, Keys, w_fold, lam, KIND, DOT_PREC)
                y += tl.exp(c_new - lam)[None, :] * tl.dot(hK, Ct.to(tl.float32), input_precision=DOT_PREC)
                if do_write:
                    store_state_tile(hK, st_base, sc_base, st_off, st_row, st_mask, offs_p, p_ok, seed_ptr, slot,
                                     st_pool, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
            if HAS_D:
                y += tl.load(D_ptr + h).to(tl.float32) * Xnf
            io_mask = p_ok[:, None] & t_ok[None, :]
            if HAS_Z:
                zt = tl.load(z_ptr + row_off * s_z_b + tok[None, :] * s_z_t + h * s_z_h + offs_p[:, None],
                             mask=io_mask, other=0.0).to(tl.float32)
                y = y * _silu(zt)
            tl.store(out_ptr + row_off * s_o_b + tok[None, :] * s_o_t + h * s_o_h + offs_p[:, None],
                     y.to(out_ptr.dtype.element_ty), mask=io_mask)

            # ring appends of the new keys, disjoint from the history rows read above (pnat + T <= L)
            new_ring_row = _wrap(rs + K + j_new, L)
            new_ok = ~is_hist & key_ok & (new_ring_row >= 0) & (new_ring_row < L)
            tl.store(xc_base + new_ring_row[None, :] * s_xc_l + offs_p[:, None], X_all,
                     mask=p_ok[:, None] & new_ok[None, :])
            if pt == 0:
                tl.store(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + new_ring_row, dt_key, mask=new_ok)
                if h % HPG == 0:
                    tl.store(Bc_base + new_ring_row[:, None] * s_Bc_l + offs_n[None, :], Keys,
                             mask=new_ok[:, None] & n_ok[None, :])
        elif PDL:
            gdc_wait()      # padding row: nothing to do, but the launch must not finish before its producer
    elif PDL:
        gdc_wait()          # past the plan's count: likewise


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
LAUNCHES = ("auto", "dynamic", "split")
MAX_TILE = 8192      # state elements per program (64 x 128): 64 fp32 registers per thread at 4 warps
PRECISIONS = {"fast": "tf32", "exact": "ieee"}


def sr_by_rows(state, block_n):
    """Whether every state row starts on a multiple of 4 in the pool, so the SR store can draw its bits
    at one Philox evaluation per four elements (the same bits as one per element)."""
    return block_n % 4 == 0 and all(st % 4 == 0 for st in state.stride()[:3])


def tma_ready(state) -> bool:
    """Whether the state pool can be read through a TMA descriptor: 16-byte aligned base and strides,
    contiguous rows; on a GPU, or in the interpreter (which emulates the descriptor)."""
    es = state.element_size()
    return (state.stride(3) == 1 and state.data_ptr() % 16 == 0
            and all(st * es % 16 == 0 for st in state.stride()[:3])
            and (state.is_cuda or interpreting()))


def reads_plan(batch, device, P, N, state_dtype, launch="auto") -> bool:
    """Whether a step of `batch` rows runs the split launches, the only ones that read a StepPlan
    (launch="auto" splits from the tuning table's split_min_batch on)."""
    return _splits(batch, tuning.config_for(device, "ssu", P, N, state_dtype), launch)


def _splits(batch, cfg, launch):
    return batch >= cfg["split_min_batch"] if launch == "auto" else launch == "split"


def _launch(branch, grid, a, cfg, order, slots, counts, use_order):
    # the split launches may have their own warps / register caps: the write launch holds more live
    # state, the no-write launch less than the dynamic one (which holds both branches' code)
    if branch == WRITE:
        cfg = {**cfg, **cfg.get("write", {})}
    elif branch == NO_WRITE:
        cfg = {**cfg, **cfg.get("no_write", {})}
    state, block_p = a["ptrs"][0], cfg["BLOCK_P"]
    tn = max(cfg["TN_MIN"], triton.next_power_of_2(a["sizes"][1]))
    tma = bool(cfg.get("tma")) and tma_ready(state)
    desc = TensorDescriptor(state, list(state.shape), list(state.stride()), [1, 1, block_p, a["flags"]["BLOCK_N"]]) \
        if tma else state
    _ssu_kernel[grid](
        *a["ptrs"], order, slots, counts, a["seed"], desc, *a["sizes"], *a["strides"],
        BRANCH=branch, USE_ORDER=use_order, **a["flags"], TMA=tma, BLOCK_P=block_p, num_warps=cfg["num_warps"],
        TN=tn, NK=triton.next_power_of_2(MAX_WINDOW + tn),
        **({"launch_pdl": True} if a["flags"]["PDL"] else {}),
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and a["cuda"] else {}))


def _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
         D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
         philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch, precision,
         validate, pdl=False):
    """The launcher shared by checkpointing_ssu and always_write_ssu: checks every argument before
    anything is written, picks the config from the tuning table, launches."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
    if rounding not in ("rn", "sr"):
        raise ValueError(f"rounding: expected 'rn' or 'sr', got {rounding!r}")
    sh, A_h, dt_c, D_h, bias_h = check_ssu_args(
        state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
        D, z, dt_bias, state_batch_indices, pad_slot_id, state_scale, cu_seqlens, max_seqlen, window,
        check_slots=validate)
    if dt_cache.dtype != torch.float32:
        raise TypeError(f"dt_cache: expected torch.float32 for the Triton op, got {dt_cache.dtype}")
    if state.dtype not in STATE_KIND:
        raise TypeError(f"state: expected one of {[str(d) for d in STATE_KIND]}, got {state.dtype}")
    if rounding == "sr":
        if not isinstance(rand_seed, torch.Tensor):
            raise ValueError(f"rand_seed: expected per-slot seeds (slots,) int64 for rounding='sr', "
                             f"got {type(rand_seed).__name__}")
        check_tensor("rand_seed", rand_seed, shape=(sh.num_slots,), dtype=torch.int64, device=x.device)
    if sh.batch == 0:
        return out
    if sh.T > 16 or sh.L > 2 * 16:
        raise ValueError(f"x: expected at most 16 tokens per row and ring length <= 32, got T={sh.T}, L={sh.L}")
    dev = x.device
    cfg = tuning.config_for(dev, "ssu", sh.P, sh.N, state.dtype)
    # a program holds whole state rows (the quantized kinds need a row's amax); cap its tile's size
    block_n = triton.next_power_of_2(sh.N)
    block_p = min(cfg["BLOCK_P"], max(16, triton.next_power_of_2(sh.P)), max(16, MAX_TILE // block_n))
    cfg["BLOCK_P"] = block_p
    npt = triton.cdiv(sh.P, block_p)
    kind = STATE_KIND[state.dtype]
    rect = no_write_form == "rectangle"
    # C·Sᵀ on 16-bit operands when that is exact: a state in C's dtype, or 8-bit codes (|q| <= 448)
    native_cs = rect and C.dtype in (torch.float16, torch.bfloat16) and (
        state.dtype == C.dtype or state.dtype in (torch.int8, torch.float8_e4m3fn))
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    sbi = state_batch_indices if state_batch_indices is not None else dummy
    scale = state_scale if state_scale is not None else dummy
    seed = rand_seed if rounding == "sr" else dummy
    if sh.varlen:
        s_x = (0, x.stride(0), x.stride(1))
        s_dt = (0, dt_c.stride(0), dt_c.stride(1))
        s_B = (0, B.stride(0), B.stride(1))
        s_o = (0, out.stride(0), out.stride(1))
        s_z = (0, z.stride(0), z.stride(1)) if z is not None else (0, 0, 0)
    else:
        s_x, s_dt, s_B, s_o = x.stride()[:3], dt_c.stride(), B.stride()[:3], out.stride()[:3]
        s_z = z.stride()[:3] if z is not None else (0, 0, 0)
    check_kernel_layout(x, B, C, out, z)
    a = dict(
        cuda=dev.type == "cuda",
        ptrs=(state, scale, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
              x, dt_c, A_h, B, C, out, D_h if D_h is not None else dummy, z if z is not None else dummy,
              bias_h if bias_h is not None else dummy, sbi,
              cu_seqlens if cu_seqlens is not None else dummy),
        seed=seed,
        sizes=(sh.batch, sh.T, sh.W, sh.L, pad_slot_id, sh.H, sh.P, sh.N, sh.H // sh.G, npt),
        strides=(state.stride(0), state.stride(1), state.stride(2),
                 scale.stride(0) if state_scale is not None else 0,
                 scale.stride(1) if state_scale is not None else 0,
                 x_cache.stride(0), x_cache.stride(1), x_cache.stride(2),
                 B_cache.stride(0), B_cache.stride(1), B_cache.stride(2),
                 dt_cache.stride(0), dt_cache.stride(1), *s_x, *s_dt, *s_B, *s_o, *s_z),
        flags=dict(RECT=rect, HAS_D=D_h is not None, HAS_Z=z is not None,
                   HAS_BIAS=bias_h is not None, SOFTPLUS=bool(dt_softplus), VARLEN=sh.varlen,
                   HAS_SBI=state_batch_indices is not None, KIND=kind,
                   EVEN_TILE=sh.P % block_p == 0 and sh.N == block_n,
                   SR=rounding == "sr", SR_ROWS=sr_by_rows(state, block_n), PHILOX_ROUNDS=int(philox_rounds),
                   BLOCK_N=block_n, KH=MAX_WINDOW,
                   DOT_PREC=PRECISIONS[precision], NATIVE_CS=native_cs,
                   PDL=bool(pdl) and pdl_supported(dev),
                   UPCAST=interpreting() or B.dtype == torch.float32),
    )
    if launch == "auto":
        launch = "split" if _splits(sh.batch, cfg, launch) else "dynamic"
    # one program per (row, state-row tile, head); split launches size theirs from device counts
    grid = (sh.batch * npt * sh.H,)
    if launch == "always_write":      # the always-write baseline: every row writes, no plan
        _launch(WRITE, grid, a, cfg, dummy, dummy, dummy, False)
        return out
    if launch == "dynamic":
        _launch(DYNAMIC, grid, a, cfg, dummy, dummy, dummy, False)
        return out
    if plan is None:
        plan = StepPlan(sh.batch, dev)
        sbi_plan = state_batch_indices if state_batch_indices is not None else torch.arange(
            sh.batch, dtype=torch.int32, device=dev)
        lens = sh.T if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1])
        plan.build(prev_num_accepted_tokens, sbi_plan, sh.W, lens, pad_slot_id)
    elif plan.batch != sh.batch:
        raise ValueError(f"plan: expected a plan built for this step's {sh.batch} rows, got one for {plan.batch}")
    # each launch sizes its own work from the device counts; the grid covers the worst case
    _launch(WRITE, grid, a, cfg, plan.order, plan.slots, plan.counts, True)
    _launch(NO_WRITE, grid, a, cfg, plan.order, plan.slots, plan.counts, True)
    return out


def checkpointing_ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
                      x, dt, A, B, C, out, D=None, z=None, dt_bias=None, dt_softplus=False,
                      state_batch_indices=None, pad_slot_id=-1, state_scale=None, rand_seed=None,
                      philox_rounds=10, cu_seqlens=None, max_seqlen=None, window=None, rounding="rn",
                      no_write_form="rectangle", plan=None, launch="auto", precision="fast",
                      validate=True, pdl=False):
    """One verify step of checkpointing replay (Triton). Mutates the caches; returns `out`.

    Shapes (batch rows, T tokens per row, H heads, P head_dim, N d_state, G groups, L ring rows):
        state (slots, H, P, N) fp32/bf16/fp16 (int8/fp8 with state_scale (slots, H, P) fp32)
        x_cache (slots, H, L, P), B_cache (slots, G, L, N) in the activation dtype
        dt_cache (slots, H, L) fp32 (processed dt); ring_start, prev_num_accepted_tokens (slots,) int32
        x, z, out (batch, T, H, P); dt (batch, T, H, P) tied (stride(-1) = 0) or (batch, T, H)
        A (H, P, N) tied or (H,); D, dt_bias (H, P) tied or (H,); B, C (batch, T, G, N)
        varlen: x, z, out (tokens, H, P), dt (tokens, H[, P]), B, C (tokens, G, N) with
        cu_seqlens (batch + 1,) and max_seqlen.
        state_batch_indices (batch,) int32 slot of each row (pad_slot_id: padding row, untouched).
    Rows with pnat + len > W (W = window, default L - T) store their folded state; the others leave
    it bit-identical. ring_start/pnat are updated by `SSMCache.commit` after verification.

    Options: no_write_form "rectangle" | "replay"; launch "auto" | "dynamic" (one launch, branch per
    row) | "split" (write and no-write launches over `plan`, a StepPlan built here when None);
    precision "fast" (tf32 dots) | "exact" (fp32 dots); rounding "rn" | "sr" (needs rand_seed (slots,)
    int64); validate=False skips the host-side slot checks (needed inside CUDA graphs);
    pdl=True (CUDA) launches with Programmatic Dependent Launch: the kernel may start while the previous
    kernel (e.g. conv1d_update(pdl=True)) finishes, loading the state and the ring history before it
    waits for the new tokens' inputs. Ignored on the CPU.
    """
    if no_write_form not in ("rectangle", "replay"):
        raise ValueError(f"no_write_form: expected 'rectangle' or 'replay', got {no_write_form!r}")
    if launch not in LAUNCHES:
        raise ValueError(f"launch: expected one of {LAUNCHES}, got {launch!r}")
    return _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C,
                out, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
                philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch,
                precision, validate, pdl)
