"""Checkpointing replay: the SSM state update of one verify step on the ring contract (DESIGN §3–§5).

One program handles one item = (row, head, tile of BLOCK_P state rows): it loads the state tile once,
the row's history (ring rows) and new tokens, and computes every output of the row in closed form.
History and new tokens are two key blocks (KH = 16 history slots, TN >= 16 new-token slots), so every
matrix product is a tensor-core tile:

    y      = exp(c_t)·(C·Sᵀ) + coef_hist @ X_hist + coef_new @ X_new + D·x    (rectangle form)
    h_K    = exp(Λ)·S + (X_hist·w)ᵀ @ B_hist                                   (write rows only)

with c the running sum of A·dt over history then new tokens. Rows whose history would overflow
(pnat + len > W) store h_K; the others leave the state bit-identical. The replay form (materialize
h_K, then y = exp(c_t − Λ)·(C·h_Kᵀ) + ...) is kept selectable for comparison.

Launch modes: "dynamic" (one persistent launch, each item branches on its own row), "split" (two
persistent launches over the write-first StepPlan, each compiled for one branch). Baselines live in
specssm/ops/baselines.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._checks import QUANT_STATE_DTYPES, check_ssu_args
from specssm.cache.plan import StepPlan
from specssm.ops import tuning
from specssm.ops.store import store_state_tile, load_state_tile, STATE_KIND

DYNAMIC, WRITE, NO_WRITE = 0, 1, 2


@triton.jit
def _softplus(v):
    # log(1 + exp(v)) loses all digits for v << 0 in fp32; exp(v) is exact to first order there
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def _ssu_item(
    item, state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
    sbi_ptr, cu_ptr, order_ptr, row_base, seed_ptr,
    T, W, L, pad_slot_id, H, P, N, HPG, NPT,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, HAS_SBI: tl.constexpr,
    USE_ORDER: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KH: tl.constexpr, TN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    row_i = item // (H * NPT)
    rem = item % (H * NPT)
    h = rem // NPT
    pt = rem % NPT
    if USE_ORDER:
        row = tl.load(order_ptr + row_base + row_i)
    else:
        row = row_i
    if HAS_SBI:
        slot = tl.load(sbi_ptr + row).to(tl.int64)
    else:
        slot = row.to(tl.int64)
    if slot != pad_slot_id:
        _ssu_work(row, slot, h, pt, state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
                  x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr, cu_ptr, seed_ptr,
                  T, W, L, H, P, N, HPG,
                  s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
                  s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
                  s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
                  s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
                  BRANCH, RECT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, VARLEN,
                  KIND, SR, PHILOX_ROUNDS, BLOCK_P, BLOCK_N, KH, TN, DOT_PREC)


@triton.jit
def _ssu_work(
    row, slot, h, pt, state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr, cu_ptr, seed_ptr,
    T, W, L, H, P, N, HPG,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr,
    KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KH: tl.constexpr, TN: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    if VARLEN:
        tok0 = tl.load(cu_ptr + row).to(tl.int64)
        n_tok = (tl.load(cu_ptr + row + 1) - tok0).to(tl.int32)
        row_off = 0
    else:
        tok0 = 0
        n_tok = T
        row_off = row.to(tl.int64)
    K = tl.load(pnat_ptr + slot)
    rs = tl.load(ring_start_ptr + slot)
    if BRANCH == DYNAMIC:
        do_write = K + n_tok > W
    else:
        do_write = BRANCH == WRITE
    g = h // HPG

    jh = tl.arange(0, KH)                      # history key slots
    jn = tl.arange(0, TN)                      # new-token key slots (and output rows)
    offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_ok = offs_p < P
    n_ok = offs_n < N
    h_ok = jh < K
    t_ok = jn < n_tok
    hist_rows = (rs + jh) % L
    new_rows = (rs + K + jn) % L
    tok = tok0 + jn

    # ---- decays: c over history, then Λ + c over new tokens --------------------------------------
    A = tl.load(A_ptr + h).to(tl.float32)
    dt_hist = tl.load(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + hist_rows, mask=h_ok, other=0.0)
    dt_new = tl.load(dt_ptr + row_off * s_dt_b + tok * s_dt_t + h * s_dt_h, mask=t_ok, other=0.0)
    dt_new = dt_new.to(tl.float32)
    if HAS_BIAS:
        dt_new += tl.load(dt_bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt_new = _softplus(dt_new)
    dt_new = tl.where(t_ok, dt_new, 0.0)
    c_hist = tl.cumsum(A * dt_hist, axis=0)
    lam = tl.sum(A * dt_hist, axis=0)
    c_new = lam + tl.cumsum(A * dt_new, axis=0)

    # ---- inputs of the keys -------------------------------------------------------------------
    B_hist = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + hist_rows[:, None] * s_Bc_l + offs_n[None, :],
                     mask=h_ok[:, None] & n_ok[None, :], other=0.0)
    B_new = tl.load(B_ptr + row_off * s_B_b + tok[:, None] * s_B_t + g * s_B_g + offs_n[None, :],
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
    C_new = tl.load(C_ptr + row_off * s_B_b + tok[:, None] * s_B_t + g * s_B_g + offs_n[None, :],
                    mask=t_ok[:, None] & n_ok[None, :], other=0.0)
    X_hist = tl.load(xc_ptr + slot * s_xc_s + h * s_xc_h + hist_rows[:, None] * s_xc_l + offs_p[None, :],
                     mask=h_ok[:, None] & p_ok[None, :], other=0.0)
    X_new = tl.load(x_ptr + row_off * s_x_b + tok[:, None] * s_x_t + h * s_x_h + offs_p[None, :],
                    mask=t_ok[:, None] & p_ok[None, :], other=0.0)
    Cf = C_new.to(tl.float32)
    Bhf = B_hist.to(tl.float32)
    Xhf = X_hist.to(tl.float32)
    Xnf = X_new.to(tl.float32)

    # ---- new-token keys: the causal triangle ----------------------------------------------------
    cb_new = tl.dot(Cf, tl.trans(B_new.to(tl.float32)), input_precision=DOT_PREC)     # (TN, TN)
    causal = (jn[None, :] <= jn[:, None]) & t_ok[None, :]
    seg = tl.where(causal, c_new[:, None] - c_new[None, :], float("-inf"))
    coef_new = cb_new * tl.exp(seg) * dt_new[None, :]
    y = tl.dot(coef_new, Xnf, input_precision=DOT_PREC)                                 # (TN, BLOCK_P)

    # ---- state tile ---------------------------------------------------------------------------
    st_off = slot * s_st_s + h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :]
    st_mask = p_ok[:, None] & n_ok[None, :]
    S = load_state_tile(state_ptr, scale_ptr, st_off, st_mask,
                        slot * s_sc_s + h * s_sc_h + offs_p, p_ok, KIND)
    need_hK = do_write or (not RECT)
    if need_hK:
        w_hist = tl.where(h_ok, tl.exp(lam - c_hist) * dt_hist, 0.0)
        hK = tl.exp(lam) * S + tl.dot(tl.trans(Xhf * w_hist[:, None]), Bhf, input_precision=DOT_PREC)
    if RECT:
        cb_hist = tl.dot(Cf, tl.trans(Bhf), input_precision=DOT_PREC)                  # (TN, KH)
        vis = t_ok[:, None] & h_ok[None, :]
        coef_hist = cb_hist * tl.exp(tl.where(vis, c_new[:, None] - c_hist[None, :], float("-inf")))
        coef_hist = coef_hist * dt_hist[None, :]
        y += tl.dot(coef_hist, Xhf, input_precision=DOT_PREC)
        y += tl.exp(c_new)[:, None] * tl.dot(Cf, tl.trans(S), input_precision=DOT_PREC)
    else:
        y += tl.exp(c_new - lam)[:, None] * tl.dot(Cf, tl.trans(hK), input_precision=DOT_PREC)
    if do_write:
        store_state_tile(hK, state_ptr, scale_ptr, st_off, st_mask,
                         slot * s_sc_s + h * s_sc_h + offs_p, p_ok, seed_ptr, slot,
                         KIND, SR, PHILOX_ROUNDS)

    # ---- outputs: skip, gate --------------------------------------------------------------------
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * Xnf
    if HAS_Z:
        zt = tl.load(z_ptr + row_off * s_z_b + tok[:, None] * s_z_t + h * s_z_h + offs_p[None, :],
                     mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)
        y = y * zt * tl.sigmoid(zt)
    io_mask = t_ok[:, None] & p_ok[None, :]
    tl.store(out_ptr + row_off * s_o_b + tok[:, None] * s_o_t + h * s_o_h + offs_p[None, :],
             y.to(out_ptr.dtype.element_ty), mask=io_mask)

    # ---- ring appends (disjoint from the history rows read above) ------------------------------
    tl.store(xc_ptr + slot * s_xc_s + h * s_xc_h + new_rows[:, None] * s_xc_l + offs_p[None, :],
             X_new, mask=io_mask)
    if pt == 0:
        tl.store(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + new_rows, dt_new, mask=t_ok)
        if h % HPG == 0:
            tl.store(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + new_rows[:, None] * s_Bc_l + offs_n[None, :],
                     B_new, mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _ssu_kernel(
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
    sbi_ptr, cu_ptr, order_ptr, counts_ptr, seed_ptr,
    batch, T, W, L, pad_slot_id, H, P, N, HPG, NPT,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, HAS_SBI: tl.constexpr,
    USE_ORDER: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, KH: tl.constexpr, TN: tl.constexpr,
    DOT_PREC: tl.constexpr, PERSISTENT: tl.constexpr,
):
    # rows of this launch: all rows, or one group of the write-first plan (counts from the device)
    if not USE_ORDER:
        row_base = 0
        n_rows = batch
    elif BRANCH == WRITE:
        row_base = 0
        n_rows = tl.load(counts_ptr)
    elif BRANCH == NO_WRITE:
        row_base = tl.load(counts_ptr)
        n_rows = tl.load(counts_ptr + 1) - row_base
    else:
        row_base = 0
        n_rows = batch
    n_items = n_rows * H * NPT
    pid = tl.program_id(0)
    if PERSISTENT:
        nprog = tl.num_programs(0)
        for item in tl.range(pid, n_items, nprog):
            _ssu_item(item, state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
                      x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
                      sbi_ptr, cu_ptr, order_ptr, row_base, seed_ptr,
                      T, W, L, pad_slot_id, H, P, N, HPG, NPT,
                      s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
                      s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
                      s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
                      s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
                      BRANCH, RECT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, VARLEN, HAS_SBI, USE_ORDER,
                      KIND, SR, PHILOX_ROUNDS, BLOCK_P, BLOCK_N, KH, TN, DOT_PREC)
    else:
        if pid < n_items:
            _ssu_item(pid, state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
                      x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
                      sbi_ptr, cu_ptr, order_ptr, row_base, seed_ptr,
                      T, W, L, pad_slot_id, H, P, N, HPG, NPT,
                      s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
                      s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
                      s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
                      s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
                      BRANCH, RECT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, VARLEN, HAS_SBI, USE_ORDER,
                      KIND, SR, PHILOX_ROUNDS, BLOCK_P, BLOCK_N, KH, TN, DOT_PREC)


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
LAUNCHES = ("auto", "dynamic", "split")
PRECISIONS = {"fast": "tf32", "exact": "ieee"}


def _launch(branch, grid, persistent, a, cfg, order, counts, use_order):
    _ssu_kernel[grid](
        *a["ptrs"], order, counts, a["seed"], *a["sizes"], *a["strides"],
        BRANCH=branch, USE_ORDER=use_order, PERSISTENT=persistent, **a["flags"],
        BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def checkpointing_ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
                      x, dt, A, B, C, out, D=None, z=None, dt_bias=None, dt_softplus=False,
                      state_batch_indices=None, pad_slot_id=-1, state_scale=None, rand_seed=None,
                      philox_rounds=10, cu_seqlens=None, max_seqlen=None, window=None, rounding="rn",
                      no_write_form="rectangle", plan=None, launch="auto", precision="fast",
                      validate=True):
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
    int64); validate=False skips the host-side slot checks (needed inside CUDA graphs).
    """
    if no_write_form not in ("rectangle", "replay"):
        raise ValueError(f"no_write_form: expected 'rectangle' or 'replay', got {no_write_form!r}")
    if launch not in LAUNCHES:
        raise ValueError(f"launch: expected one of {LAUNCHES}, got {launch!r}")
    return _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C,
                out, D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
                philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch,
                precision, validate)


def _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
         D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
         philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch, precision,
         validate):
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
        if tuple(rand_seed.shape) != (sh.num_slots,) or rand_seed.dtype != torch.int64:
            raise ValueError(f"rand_seed: expected shape ({sh.num_slots},) int64, got "
                             f"{tuple(rand_seed.shape)} {rand_seed.dtype}")
    if sh.batch == 0:
        return out
    if sh.T > 16 or sh.L > 2 * 16:
        raise ValueError(f"x: expected at most 16 tokens per row and ring length <= 32, got T={sh.T}, L={sh.L}")
    dev = x.device
    cfg = tuning.config_for(dev, "ssu", sh.P, sh.N, state.dtype)
    block_p = min(cfg["BLOCK_P"], max(16, triton.next_power_of_2(sh.P)))
    cfg["BLOCK_P"] = block_p
    npt = triton.cdiv(sh.P, block_p)
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
    for name, t in (("x", x), ("B", B), ("C", C), ("out", out), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension (stride 1), got strides {tuple(t.stride())}")
    if C.stride() != B.stride():
        raise ValueError(f"C: expected the same strides as B {tuple(B.stride())}, got {tuple(C.stride())}")
    a = dict(
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
        flags=dict(RECT=no_write_form == "rectangle", HAS_D=D_h is not None, HAS_Z=z is not None,
                   HAS_BIAS=bias_h is not None, SOFTPLUS=bool(dt_softplus), VARLEN=sh.varlen,
                   HAS_SBI=state_batch_indices is not None, KIND=STATE_KIND[state.dtype],
                   SR=rounding == "sr", PHILOX_ROUNDS=int(philox_rounds),
                   BLOCK_N=triton.next_power_of_2(sh.N), KH=16,
                   TN=max(16, triton.next_power_of_2(sh.T)), DOT_PREC=PRECISIONS[precision]),
    )
    if launch == "auto":
        launch = "split" if sh.batch >= cfg["split_min_batch"] else "dynamic"
    n_items = sh.batch * sh.H * npt
    if dev.type == "cuda" and cfg["programs_per_sm"] > 0:
        nprog = tuning.num_sms(dev.index if dev.index is not None else torch.cuda.current_device())
        nprog *= cfg["programs_per_sm"]
    else:
        nprog = 0
    persistent = 0 < nprog < n_items
    grid = (min(nprog, n_items) if persistent else n_items,)
    if launch == "always_write":      # the always-write baseline: every row writes, no plan
        _launch(WRITE, grid, persistent, a, cfg, dummy, dummy, False)
        return out
    if launch == "dynamic":
        _launch(DYNAMIC, grid, persistent, a, cfg, dummy, dummy, False)
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
    _launch(WRITE, grid, persistent, a, cfg, plan.order, plan.counts, True)
    _launch(NO_WRITE, grid, persistent, a, cfg, plan.order, plan.counts, True)
    return out
