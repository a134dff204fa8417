"""Checkpointing replay: the SSM state update of one verify step on the ring contract (DESIGN §3–§5).

One program handles one row, one tile of BLOCK_P state rows and HC heads of one group: the group's
keys and Bᵀ·C are loaded and computed once, then per head it reads the head's history (ring rows) and
new tokens, walks its state tile once in column chunks of NCH, and computes every output of the row in
closed form. History and new tokens are two key blocks (KH = 16 history slots, TN >= 16 new-token
slots), so every matrix product is a tensor-core tile; the products are computed transposed (state rows
x tokens), so the state is the left operand in its stored layout:

    y      = exp(c_t)·(C·Sᵀ) + coef_hist @ X_hist + coef_new @ X_new + D·x    (rectangle form)
    h_K    = exp(Λ)·S + (X_hist·w)ᵀ @ B_hist                                   (write rows only)

with c the running sum of A·dt over history then new tokens. Rows whose history would overflow
(pnat + len > W) store h_K; the others leave the state bit-identical. The replay form (materialize
h_K, then y = exp(c_t − Λ)·(C·h_Kᵀ) + ...) is kept selectable for comparison.

Launch modes: "dynamic" (one launch, each row branches on its own flush test), "split" (two launches
over the write-first StepPlan, each compiled for one branch; programs past the plan's count exit).
Baselines live in specssm/ops/baselines.py; why the kernel looks like this: docs/performance.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._checks import QUANT_STATE_DTYPES, check_kernel_layout, check_ssu_args, check_tensor
from specssm.cache.plan import StepPlan
from specssm.ops import tuning
from specssm.ops.store import store_state_tile, load_state_tile, STATE_KIND

DYNAMIC, WRITE, NO_WRITE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _softplus(v):
    # log(1 + exp(v)) loses all digits for v << 0 in fp32; exp(v) is exact to first order there
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def _ssu_head(
    h, row_off, tok, slot, K, n_tok, hist_rows, do_write, pt, cbT_new, cbT_hist,
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, x_ptr, dt_ptr, A_ptr, C_ptr, out_ptr, D_ptr, z_ptr,
    dt_bias_ptr, seed_ptr, P, N, L, rs, g,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h, s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l,
    s_dtc_s, s_dtc_h, s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NCH: tl.constexpr, KH: tl.constexpr,
    TN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One head of one row: decays, outputs, the state store (write rows) and the x/dt appends.

    Everything is transposed, (state rows, tokens): the state tile is the A operand of its products in
    its stored (N-contiguous) layout. The state is visited in column chunks of NCH so that a chunk,
    not the whole (BLOCK_P, N) tile, lives in registers."""
    jh = tl.arange(0, KH)
    jn = tl.arange(0, TN)
    offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    h_ok = jh < K
    t_ok = jn < n_tok
    X_hist = tl.load(xc_ptr + slot * s_xc_s + h * s_xc_h + hist_rows[None, :] * s_xc_l + offs_p[:, None],
                     mask=p_ok[:, None] & h_ok[None, :], other=0.0)                     # (BLOCK_P, KH)
    X_new = tl.load(x_ptr + row_off * s_x_b + tok[None, :] * s_x_t + h * s_x_h + offs_p[:, None],
                    mask=p_ok[:, None] & t_ok[None, :], other=0.0)                      # (BLOCK_P, TN)

    # decays: c over the history, then Λ + c over the new tokens
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

    Xhf = X_hist.to(tl.float32)
    Xnf = X_new.to(tl.float32)
    causal = (jn[:, None] <= jn[None, :]) & t_ok[:, None]
    coef_new = cbT_new * tl.exp(tl.where(causal, c_new[None, :] - c_new[:, None], float("-inf")))
    y = tl.dot(Xnf, coef_new * dt_new[:, None], input_precision=DOT_PREC)             # (BLOCK_P, TN)
    if RECT:
        vis = h_ok[:, None] & t_ok[None, :]
        coef_hist = cbT_hist * tl.exp(tl.where(vis, c_new[None, :] - c_hist[:, None], float("-inf")))
        y += tl.dot(Xhf, coef_hist * dt_hist[:, None], input_precision=DOT_PREC)
    # x_k weighted by its decay to the end of the history: the fold's left factor
    Xw = Xhf * tl.where(h_ok, tl.exp(lam - c_hist) * dt_hist, 0.0)[None, :]
    decay_hist = tl.exp(lam)

    # the state, chunk by chunk: C·Sᵀ (rectangle) or C·h_Kᵀ (replay), and h_K for write rows
    cs = tl.zeros((BLOCK_P, TN), dtype=tl.float32)
    for n0 in tl.static_range(0, BLOCK_N, NCH):
        offs_n = n0 + tl.arange(0, NCH)
        n_ok = offs_n < N
        st_off = slot * s_st_s + h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :]
        st_mask = p_ok[:, None] & n_ok[None, :]
        sc_off = slot * s_sc_s + h * s_sc_h + offs_p
        S = load_state_tile(state_ptr, scale_ptr, st_off, st_mask, sc_off, p_ok, KIND)
        Ct = tl.load(C_ptr + row_off * s_B_b + tok[None, :] * s_B_t + g * s_B_g + offs_n[:, None],
                     mask=n_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)     # (NCH, TN)
        if RECT:
            cs += tl.dot(S, Ct, input_precision=DOT_PREC)
            if do_write:
                Bh = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + hist_rows[:, None] * s_Bc_l + offs_n[None, :],
                             mask=h_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                hK = decay_hist * S + tl.dot(Xw, Bh, input_precision=DOT_PREC)
                store_state_tile(hK, state_ptr, scale_ptr, st_off, st_mask, sc_off, p_ok, seed_ptr, slot,
                                 KIND, SR, PHILOX_ROUNDS)
        else:
            Bh = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + hist_rows[:, None] * s_Bc_l + offs_n[None, :],
                         mask=h_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            hK = decay_hist * S + tl.dot(Xw, Bh, input_precision=DOT_PREC)
            cs += tl.dot(hK, Ct, input_precision=DOT_PREC)
            if do_write:
                store_state_tile(hK, state_ptr, scale_ptr, st_off, st_mask, sc_off, p_ok, seed_ptr, slot,
                                 KIND, SR, PHILOX_ROUNDS)
    if RECT:
        y += tl.exp(c_new)[None, :] * cs
    else:
        y += tl.exp(c_new - lam)[None, :] * cs
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * Xnf
    io_mask = p_ok[:, None] & t_ok[None, :]
    if HAS_Z:
        zt = tl.load(z_ptr + row_off * s_z_b + tok[None, :] * s_z_t + h * s_z_h + offs_p[:, None],
                     mask=io_mask, other=0.0).to(tl.float32)
        y = y * zt * tl.sigmoid(zt)
    tl.store(out_ptr + row_off * s_o_b + tok[None, :] * s_o_t + h * s_o_h + offs_p[:, None],
             y.to(out_ptr.dtype.element_ty), mask=io_mask)

    # ring appends (disjoint from the history rows read above)
    new_rows = (rs + K + jn) % L
    tl.store(xc_ptr + slot * s_xc_s + h * s_xc_h + new_rows[None, :] * s_xc_l + offs_p[:, None],
             X_new, mask=io_mask)
    if pt == 0:
        tl.store(dtc_ptr + slot * s_dtc_s + h * s_dtc_h + new_rows, dt_new, mask=t_ok)


@triton.jit
def _ssu_kernel(
    state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, ring_start_ptr, pnat_ptr,
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr,
    sbi_ptr, cu_ptr, order_ptr, counts_ptr, seed_ptr,
    batch, T, W, L, pad_slot_id, H, P, N, HPG, NPT, NHC,
    s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h,
    s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g, s_Bc_l, s_dtc_s, s_dtc_h,
    s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    BRANCH: tl.constexpr, RECT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VARLEN: tl.constexpr, HAS_SBI: tl.constexpr,
    USE_ORDER: tl.constexpr, KIND: tl.constexpr, SR: tl.constexpr, PHILOX_ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, NCH: tl.constexpr, KH: tl.constexpr,
    TN: tl.constexpr, HC: tl.constexpr, DOT_PREC: tl.constexpr, STAGES: tl.constexpr,
):
    # one program: one row, one tile of state rows, HC heads of one group
    pid = tl.program_id(0)
    row_i = pid // (NPT * NHC)
    pt = (pid // NHC) % NPT
    h0 = (pid % NHC) * HC
    if not USE_ORDER:
        row_base = 0
        n_rows = batch
    elif BRANCH == WRITE:
        row_base = 0
        n_rows = tl.load(counts_ptr)
    else:
        row_base = tl.load(counts_ptr)
        n_rows = tl.load(counts_ptr + 1) - row_base
    if row_i < n_rows:
        if USE_ORDER:
            row = tl.load(order_ptr + row_base + row_i)
        else:
            row = row_i
        if HAS_SBI:
            slot = tl.load(sbi_ptr + row).to(tl.int64)
        else:
            slot = row.to(tl.int64)
        if slot != pad_slot_id:
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
            g = h0 // HPG
            jh = tl.arange(0, KH)
            jn = tl.arange(0, TN)
            h_ok = jh < K
            t_ok = jn < n_tok
            hist_rows = (rs + jh) % L
            new_rows = (rs + K + jn) % L
            tok = tok0 + jn
            # the group's Bᵀ·C over the keys, shared by the HC heads of this program; B ring append
            cbT_new = tl.zeros((TN, TN), dtype=tl.float32)
            cbT_hist = tl.zeros((KH, TN), dtype=tl.float32)
            for n0 in tl.static_range(0, BLOCK_N, NCH):
                offs_n = n0 + tl.arange(0, NCH)
                n_ok = offs_n < N
                Ct = tl.load(C_ptr + row_off * s_B_b + tok[None, :] * s_B_t + g * s_B_g + offs_n[:, None],
                             mask=n_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
                B_new = tl.load(B_ptr + row_off * s_B_b + tok[:, None] * s_B_t + g * s_B_g + offs_n[None, :],
                                mask=t_ok[:, None] & n_ok[None, :], other=0.0)
                B_hist = tl.load(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + hist_rows[:, None] * s_Bc_l + offs_n[None, :],
                                 mask=h_ok[:, None] & n_ok[None, :], other=0.0)
                cbT_new += tl.dot(B_new.to(tl.float32), Ct, input_precision=DOT_PREC)
                cbT_hist += tl.dot(B_hist.to(tl.float32), Ct, input_precision=DOT_PREC)
                if pt == 0 and h0 % HPG == 0:
                    tl.store(Bc_ptr + slot * s_Bc_s + g * s_Bc_g + new_rows[:, None] * s_Bc_l + offs_n[None, :],
                             B_new, mask=t_ok[:, None] & n_ok[None, :])
            for hh in tl.range(0, HC, num_stages=STAGES):
                _ssu_head(h0 + hh, row_off, tok, slot, K, n_tok, hist_rows, do_write, pt, cbT_new, cbT_hist,
                          state_ptr, scale_ptr, xc_ptr, Bc_ptr, dtc_ptr, x_ptr, dt_ptr, A_ptr, C_ptr,
                          out_ptr, D_ptr, z_ptr, dt_bias_ptr, seed_ptr, P, N, L, rs, g,
                          s_st_s, s_st_h, s_st_p, s_sc_s, s_sc_h, s_xc_s, s_xc_h, s_xc_l, s_Bc_s, s_Bc_g,
                          s_Bc_l, s_dtc_s, s_dtc_h, s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h,
                          s_B_b, s_B_t, s_B_g, s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
                          RECT, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, KIND, SR, PHILOX_ROUNDS,
                          BLOCK_P, BLOCK_N, NCH, KH, TN, DOT_PREC)


# ------------------------------------------------------------------------------------------------
# launcher
# ------------------------------------------------------------------------------------------------
LAUNCHES = ("auto", "dynamic", "split")
PRECISIONS = {"fast": "tf32", "exact": "ieee"}


def _launch(branch, grid, a, cfg, order, counts, use_order):
    _ssu_kernel[grid](
        *a["ptrs"], order, counts, a["seed"], *a["sizes"], *a["strides"],
        BRANCH=branch, USE_ORDER=use_order, **a["flags"], BLOCK_P=cfg["BLOCK_P"], HC=cfg["HC"],
        NCH=cfg["NCH"],
        STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and a["cuda"] else {}))


def _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
         D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
         philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch, precision,
         validate):
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
    block_p = min(cfg["BLOCK_P"], max(16, triton.next_power_of_2(sh.P)))
    cfg["BLOCK_P"] = block_p
    npt = triton.cdiv(sh.P, block_p)
    # heads per program: a divisor of the heads of one group, at most the table's HC
    hpg = sh.H // sh.G
    hc = max(d for d in range(1, min(cfg["HC"], hpg) + 1) if hpg % d == 0)
    cfg["HC"] = hc
    # quantized states need a whole row of N in registers for its scale
    block_n = triton.next_power_of_2(sh.N)
    cfg["NCH"] = block_n if state.dtype in QUANT_STATE_DTYPES else min(cfg["NCH"], block_n)
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
        sizes=(sh.batch, sh.T, sh.W, sh.L, pad_slot_id, sh.H, sh.P, sh.N, sh.H // sh.G, npt, sh.H // hc),
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
    # one program per (row, state-row tile, head chunk); split launches size theirs from device counts
    grid = (sh.batch * npt * (sh.H // hc),)
    if launch == "always_write":      # the always-write baseline: every row writes, no plan
        _launch(WRITE, grid, a, cfg, dummy, dummy, False)
        return out
    if launch == "dynamic":
        _launch(DYNAMIC, grid, a, cfg, dummy, dummy, False)
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
    _launch(WRITE, grid, a, cfg, plan.order, plan.counts, True)
    _launch(NO_WRITE, grid, a, cfg, plan.order, plan.counts, True)
    return out


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
