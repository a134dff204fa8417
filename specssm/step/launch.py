"""The step's launcher and public entry points: checks every argument before anything is written, picks
the launches and their configs from the tuning table, launches with keyword arguments.

launch="split" (default from the table's split_min_batch on): the coefficient kernel over (row, head
block), then the write main over the plan's write rows and the no-write main over the others, chained
by Programmatic Dependent Launch on sm_90 (each main launches early and waits before its loop).
launch="dynamic": the fused single launch (specssm/step/fused.py), which also serves the replay form.
"""
from __future__ import annotations

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from specssm import library
from specssm._checks import MAX_WINDOW, check_kernel_layout, check_ssu_args, check_tensor
from specssm._runtime import interpreting, pdl_supported
from specssm.cache.faults import new_record as new_fault_record
from specssm.cache.plan import StepPlan
from specssm.step import tuning
from specssm.step.coef import CHUNK_N as COEF_CHUNK_N
from specssm.step.coef import TM, coef_kernel
from specssm.step.fused import DYNAMIC, NO_WRITE, WRITE, fused_kernel
from specssm.step.mains import main_kernel
from specssm.step.store import STATE_KIND

LAUNCHES = ("auto", "dynamic", "split")
MAX_TILE = 8192      # state elements per tile (64 x 128)
MAX_TOKENS = int(TM)      # tokens per row: one M tile of the products
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


def _splits(batch, cfg, launch, no_write_form):
    if launch == "auto":
        return batch >= cfg["split_min_batch"] and no_write_form == "rectangle"
    return launch == "split"


def reads_plan(batch, device, P, N, state_dtype, launch="auto", T=None, W=None, H=None, G=None,
               rounding=None) -> bool:
    """Whether a step of `batch` rows reads a StepPlan: the split launches do, the fused one does not
    (launch="auto" splits from the tuning table's split_min_batch on; T, W, H, G and rounding pick the
    table entry as the op itself does)."""
    cfg = tuning.config_for(device, P, N, state_dtype, batch=batch, T=T, W=W, rounding=rounding, H=H, G=G)
    return _splits(batch, cfg, launch, "rectangle")


def _state_desc(state, block_p, block_n):
    """A TMA descriptor of the pool (slots, H, P, N) in (1, 1, block_p, block_n) boxes, zero-filled past
    P and N."""
    return TensorDescriptor(state, list(state.shape), list(state.stride()), [1, 1, block_p, block_n])


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _block_p(cfg, P, N):
    # a tile holds whole state rows (the quantized kinds need a row's amax); cap its size
    block_n = triton.next_power_of_2(N)
    return min(cfg["BLOCK_P"], max(16, triton.next_power_of_2(P)), max(16, MAX_TILE // block_n))


def _launch_fused(branch, a, cfg, order, slots, counts, use_order):
    fcfg = cfg["fused"]
    if branch == WRITE:
        fcfg = {**fcfg, **fcfg.get("write", {})}
    elif branch == NO_WRITE:
        fcfg = {**fcfg, **fcfg.get("no_write", {})}
    state, (P, N) = a["state"], (a["P"], a["N"])
    block_p = _block_p(fcfg, P, N)
    block_n = triton.next_power_of_2(N)
    tn = max(fcfg["TN_MIN"], triton.next_power_of_2(a["T"]))
    tma = bool(fcfg.get("tma")) and tma_ready(state)
    desc = _state_desc(state, block_p, block_n) if tma else state
    npt = triton.cdiv(P, block_p)
    f = a["flags"]
    fused_kernel[(a["batch"] * npt * a["H"],)](
        state_ptr=state, scale_ptr=a["scale"], xc_ptr=a["x_cache"], Bc_ptr=a["B_cache"], dtc_ptr=a["dt_cache"],
        ring_start_ptr=a["ring_start"], pnat_ptr=a["pnat"], x_ptr=a["x"], dt_ptr=a["dt"], A_ptr=a["A"],
        B_ptr=a["B"], C_ptr=a["C"], out_ptr=a["out"], D_ptr=a["D"], z_ptr=a["z"], dt_bias_ptr=a["dt_bias"],
        sbi_ptr=a["sbi"], cu_ptr=a["cu"], order_ptr=order, slots_ptr=slots, counts_ptr=counts, seed_ptr=a["seed"],
        st_desc=desc, batch=a["batch"], T=a["T"], W=a["W"], L=a["L"], pad_slot_id=a["pad"],
        num_slots=a["num_slots"], max_pnat=max(a["W"], a["T"]), faults_ptr=a["faults"], H=a["H"], P=P, N=N,
        HPG=a["HPG"], NPT=npt, **a["strides"],
        BRANCH=branch, RECT=f["RECT"], HAS_D=f["HAS_D"], HAS_Z=f["HAS_Z"], HAS_BIAS=f["HAS_BIAS"],
        SOFTPLUS=f["SOFTPLUS"], VARLEN=f["VARLEN"], HAS_SBI=f["HAS_SBI"], USE_ORDER=use_order,
        EVEN_TILE=P % block_p == 0 and N == block_n, TMA=tma, KIND=f["KIND"], SR=f["SR"],
        SR_ROWS=sr_by_rows(state, block_n), PHILOX_ROUNDS=f["PHILOX_ROUNDS"], BLOCK_P=block_p, BLOCK_N=block_n,
        KH=MAX_WINDOW, TN=tn, NK=triton.next_power_of_2(MAX_WINDOW + tn), DOT_PREC=f["DOT_PREC"],
        NATIVE_CS=f["CS16"] and f["RECT"], PDL=f["PDL"], UPCAST=f["UPCAST"], num_warps=fcfg["num_warps"],
        **({"launch_pdl": True} if f["PDL"] else {}),
        **({"maxnreg": fcfg["maxnreg"]} if fcfg.get("maxnreg") and a["cuda"] else {}))


def _launch_split(a, cfg, plan, own_plan=False):
    """Coefficient kernel, then the write and no-write mains, over `plan`'s rows (own_plan: a plan made
    for this call alone, whose scratch may be allocated inside a CUDA-graph capture). The mains follow
    each other as PDL dependents, or with the write config's `side_stream` (CUDA) run side by side."""
    f, s, dev = a["flags"], a["strides"], a["state"].device
    H, N = a["H"], a["N"]
    coef, vec = plan.scratch(H, a["x"].dtype, in_capture_ok=own_plan)
    # the write main on its own stream beside the no-write main (CUDA): no PDL chain then
    side = a["cuda"] and bool(cfg["write"].get("side_stream"))
    chain = pdl_supported(dev) and not side      # mains launched as dependents of the coefficient kernel
    hb = min(cfg["coef"]["HB"], a["HPG"] & -a["HPG"])          # a power of two dividing H / G
    to = MAX_TOKENS // 2 if a["T"] <= MAX_TOKENS // 2 else MAX_TOKENS    # query rows: T <= to
    block_n = triton.next_power_of_2(N)
    coef_kernel[(a["batch"], H // hb)](
        pnat_ptr=a["pnat"], ring_start_ptr=a["ring_start"], order_ptr=plan.order, slots_ptr=plan.slots,
        counts_ptr=plan.counts, cu_ptr=a["cu"], dt_ptr=a["dt"], dt_bias_ptr=a["dt_bias"], A_ptr=a["A"], D_ptr=a["D"],
        B_ptr=a["B"], C_ptr=a["C"], Bc_ptr=a["B_cache"], dtc_ptr=a["dt_cache"], coef_ptr=coef, vec_ptr=vec,
        batch=a["batch"], T=a["T"], L=a["L"], N=N, HPG=a["HPG"],
        s_dt_b=s["s_dt_b"], s_dt_t=s["s_dt_t"], s_dt_h=s["s_dt_h"], s_B_b=s["s_B_b"], s_B_t=s["s_B_t"],
        s_B_g=s["s_B_g"], s_Bc_s=s["s_Bc_s"], s_Bc_g=s["s_Bc_g"], s_Bc_l=s["s_Bc_l"], s_dtc_s=s["s_dtc_s"],
        s_dtc_h=s["s_dtc_h"], s_cf_b=coef.stride(0), s_cf_h=coef.stride(1), s_v_b=vec.stride(0), s_v_h=vec.stride(1),
        HAS_D=f["HAS_D"], HAS_BIAS=f["HAS_BIAS"], SOFTPLUS=f["SOFTPLUS"], VARLEN=f["VARLEN"], WAIT=f["PDL"],
        LAUNCH_DEPS=chain, UPCAST=f["UPCAST"], HB=hb, EVEN_N=N == block_n, BLOCK_N=block_n,
        CHUNK_N=min(COEF_CHUNK_N, block_n), TO=to,
        num_warps=cfg["coef"]["num_warps"], **({"launch_pdl": True} if f["PDL"] else {}),
        **({"maxnreg": cfg["coef"]["maxnreg"]} if cfg["coef"].get("maxnreg") and a["cuda"] else {}))
    if side:
        # the write main on a side stream, beside the no-write main: both after the coefficient kernel,
        # the step's stream joined with the side one before the op returns (so nothing after it, and no
        # reuse of this call's temporaries, runs before the write main is done)
        main_stream, side_stream = torch.cuda.current_stream(dev), _side_stream(dev)
        side_stream.wait_stream(main_stream)
        with torch.cuda.stream(side_stream):
            _launch_main(a, cfg, plan, coef, vec, True, False, to, block_n)
        _launch_main(a, cfg, plan, coef, vec, False, False, to, block_n)
        main_stream.wait_stream(side_stream)
    else:
        for write in (True, False):
            _launch_main(a, cfg, plan, coef, vec, write, chain, to, block_n)


def _launch_main(a, cfg, plan, coef, vec, write, chain, to, block_n):
    """The write (or no-write) main over the plan's rows; chain: launched as a PDL dependent of the
    kernel before it (and the write main lets the no-write main launch early)."""
    f, s, state, dev = a["flags"], a["strides"], a["state"], a["state"].device
    H, P, N = a["H"], a["P"], a["N"]
    mcfg = cfg["write" if write else "no_write"]
    block_p = _block_p(mcfg, P, N)
    tma = bool(mcfg["tma"]) and tma_ready(state)
    # column halves: write tiles of the unscaled kinds only (a scaled row needs its whole amax)
    col_split = mcfg.get("col_split", 1) if write and f["KIND"] < 3 and block_n >= 32 else 1
    n_tiles = a["batch"] * triton.cdiv(P, block_p) * H
    n_progs = max(1, min(n_tiles, mcfg["ctas_per_sm"] * _num_sms(dev)))
    main_kernel[(n_progs,)](
        state_ptr=state, st_desc=_state_desc(state, block_p, block_n // col_split) if tma else state,
        scale_ptr=a["scale"],
        xc_ptr=a["x_cache"], Bc_ptr=a["B_cache"], ring_start_ptr=a["ring_start"], pnat_ptr=a["pnat"],
        x_ptr=a["x"], C_ptr=a["C"], out_ptr=a["out"], z_ptr=a["z"], coef_ptr=coef, vec_ptr=vec,
        order_ptr=plan.order, slots_ptr=plan.slots, counts_ptr=plan.counts, cu_ptr=a["cu"], seed_ptr=a["seed"],
        batch=a["batch"], T=a["T"], L=a["L"], n_progs=n_progs,
        s_st_s=s["s_st_s"], s_st_h=s["s_st_h"], s_st_p=s["s_st_p"], s_sc_s=s["s_sc_s"], s_sc_h=s["s_sc_h"],
        s_xc_s=s["s_xc_s"], s_xc_h=s["s_xc_h"], s_xc_l=s["s_xc_l"], s_Bc_s=s["s_Bc_s"], s_Bc_g=s["s_Bc_g"],
        s_Bc_l=s["s_Bc_l"], s_x_b=s["s_x_b"], s_x_t=s["s_x_t"], s_x_h=s["s_x_h"], s_C_b=s["s_B_b"],
        s_C_t=s["s_B_t"], s_C_g=s["s_B_g"], s_o_b=s["s_o_b"], s_o_t=s["s_o_t"], s_o_h=s["s_o_h"],
        s_z_b=s["s_z_b"], s_z_t=s["s_z_t"], s_z_h=s["s_z_h"], s_cf_b=coef.stride(0), s_cf_h=coef.stride(1),
        s_v_b=vec.stride(0), s_v_h=vec.stride(1), H=H, P=P, N=N, HPG=a["HPG"],
        WRITE=write, HAS_Z=f["HAS_Z"], VARLEN=f["VARLEN"], KIND=f["KIND"], CS16=f["CS16"], SR=f["SR"],
        SR_ROWS=sr_by_rows(state, block_n), PHILOX_ROUNDS=f["PHILOX_ROUNDS"], TMA=tma, PDL=chain,
        LAUNCH_DEPS=chain and write, UPCAST=f["UPCAST"], DOT_PREC=f["DOT_PREC"], BLOCK_P=block_p,
        BLOCK_N=block_n, TM=MAX_TOKENS, TO=to, STAGES=mcfg["stages"], COL_SPLIT=col_split,
        PREFETCH=chain and a["cuda"] and bool(mcfg.get("prefetch")) and state.stride(3) == 1,
        num_warps=mcfg["num_warps"],
        **({"launch_pdl": True} if chain else {}),
        **({"maxnreg": mcfg["maxnreg"]} if mcfg.get("maxnreg") and a["cuda"] else {}))


def _side_stream(device) -> torch.cuda.Stream:
    """The stream the write main runs on beside the no-write main (`"side_stream"` write config), one per
    device, made at first use."""
    if device.index not in _SIDE_STREAMS:
        _SIDE_STREAMS[device.index] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device.index]


_SIDE_STREAMS: dict = {}


def _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out,
         D, z, dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed,
         philox_rounds, cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch, precision,
         validate, pdl=False, faults=None):
    """The launcher shared by checkpointing_ssu and always_write_ssu: checks every argument before
    anything is written, picks the launches and their configs, launches."""
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
    if faults is not None:
        check_tensor("faults", faults, shape=(1,), dtype=torch.int64, device=x.device)
    if sh.batch == 0:
        return out
    if sh.T > MAX_TOKENS or sh.L > 2 * MAX_WINDOW:
        raise ValueError(f"x: expected at most {MAX_TOKENS} tokens per row and ring length <= {2 * MAX_WINDOW}, "
                         f"got T={sh.T}, L={sh.L}")
    dev = x.device
    cfg = tuning.config_for(dev, sh.P, sh.N, state.dtype, batch=sh.batch, T=sh.T, W=sh.W, rounding=rounding,
                            H=sh.H, G=sh.G)
    kind = STATE_KIND[state.dtype]
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
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
    quant = state_scale is not None
    a = dict(
        cuda=dev.type == "cuda", state=state, scale=state_scale if quant else dummy, x_cache=x_cache,
        B_cache=B_cache, dt_cache=dt_cache, ring_start=ring_start, pnat=prev_num_accepted_tokens, x=x, dt=dt_c,
        A=A_h, B=B, C=C, out=out, D=D_h if D_h is not None else dummy, z=z if z is not None else dummy,
        dt_bias=bias_h if bias_h is not None else dummy,
        sbi=state_batch_indices if state_batch_indices is not None else dummy,
        cu=cu_seqlens if cu_seqlens is not None else dummy, seed=rand_seed if rounding == "sr" else dummy,
        batch=sh.batch, T=sh.T, W=sh.W, L=sh.L, pad=pad_slot_id, H=sh.H, P=sh.P, N=sh.N,
        num_slots=sh.num_slots, faults=faults if faults is not None else new_fault_record(dev),
        HPG=sh.H // sh.G,
        strides=dict(
            s_st_s=state.stride(0), s_st_h=state.stride(1), s_st_p=state.stride(2),
            s_sc_s=state_scale.stride(0) if quant else 0, s_sc_h=state_scale.stride(1) if quant else 0,
            s_xc_s=x_cache.stride(0), s_xc_h=x_cache.stride(1), s_xc_l=x_cache.stride(2),
            s_Bc_s=B_cache.stride(0), s_Bc_g=B_cache.stride(1), s_Bc_l=B_cache.stride(2),
            s_dtc_s=dt_cache.stride(0), s_dtc_h=dt_cache.stride(1),
            s_x_b=s_x[0], s_x_t=s_x[1], s_x_h=s_x[2], s_dt_b=s_dt[0], s_dt_t=s_dt[1], s_dt_h=s_dt[2],
            s_B_b=s_B[0], s_B_t=s_B[1], s_B_g=s_B[2], s_o_b=s_o[0], s_o_t=s_o[1], s_o_h=s_o[2],
            s_z_b=s_z[0], s_z_t=s_z[1], s_z_h=s_z[2]),
        flags=dict(
            RECT=no_write_form == "rectangle", HAS_D=D_h is not None, HAS_Z=z is not None,
            HAS_BIAS=bias_h is not None, SOFTPLUS=bool(dt_softplus), VARLEN=sh.varlen,
            HAS_SBI=state_batch_indices is not None, KIND=kind, SR=rounding == "sr",
            PHILOX_ROUNDS=int(philox_rounds), DOT_PREC=PRECISIONS[precision],
            # C·Sᵀ on 16-bit operands when that is exact: a state in C's dtype, or 8-bit codes (|q| <= 448)
            CS16=C.dtype in (torch.float16, torch.bfloat16) and (
                state.dtype == C.dtype or state.dtype in (torch.int8, torch.float8_e4m3fn)),
            PDL=bool(pdl) and pdl_supported(dev), UPCAST=interpreting() or B.dtype == torch.float32),
    )
    if launch == "always_write":      # the always-write baseline: every row writes
        launch = "split"
    elif launch == "auto":
        launch = "split" if _splits(sh.batch, cfg, launch, no_write_form) else "dynamic"
    if launch == "dynamic":
        _launch_fused(DYNAMIC, a, cfg, dummy, dummy, dummy, False)
        return out
    own_plan = plan is None
    if own_plan:
        plan = StepPlan(sh.batch, dev)
        sbi_plan = state_batch_indices if state_batch_indices is not None else torch.arange(
            sh.batch, dtype=torch.int32, device=dev)
        lens = sh.T if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1])
        plan.build(prev_num_accepted_tokens, sbi_plan, sh.W, lens, pad_slot_id, validate=validate,
                   ring_start=ring_start, ring_len=sh.L, max_pnat=max(sh.W, sh.T), faults=a["faults"])
    elif plan.batch != sh.batch:
        raise ValueError(f"plan: expected a plan built for this step's {sh.batch} rows, got one for {plan.batch}")
    if no_write_form == "rectangle":
        _launch_split(a, cfg, plan, own_plan)
    else:   # the replay form: the fused kernel's own split launches over the plan
        _launch_fused(WRITE, a, cfg, plan.order, plan.slots, plan.counts, True)
        _launch_fused(NO_WRITE, a, cfg, plan.order, plan.slots, plan.counts, True)
    return out


def checkpointing_ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
                      x, dt, A, B, C, out, D=None, z=None, dt_bias=None, dt_softplus=False,
                      state_batch_indices=None, pad_slot_id=-1, state_scale=None, rand_seed=None,
                      philox_rounds=10, cu_seqlens=None, max_seqlen=None, window=None, rounding="rn",
                      no_write_form="rectangle", plan=None, launch="auto", precision="fast",
                      validate=True, pdl=False, faults=None):
    """One verify step of checkpointing replay (Triton). Mutates the caches; returns `out`.

    Shapes (batch rows, T tokens per row, H heads, P head_dim, N d_state, G groups, L ring rows):
        state (slots, H, P, N) fp32/bf16/fp16 (int8/fp8/int16 with state_scale (slots, H, P) fp32)
        x_cache (slots, H, L, P), B_cache (slots, G, L, N) in the activation dtype
        dt_cache (slots, H, L) fp32 (processed dt); ring_start, prev_num_accepted_tokens (slots,) int32
        x, z, out (batch, T, H, P); dt (batch, T, H, P) tied (stride(-1) = 0) or (batch, T, H)
        A (H, P, N) tied or (H,); D, dt_bias (H, P) tied or (H,); B, C (batch, T, G, N)
        varlen: x, z, out (tokens, H, P), dt (tokens, H[, P]), B, C (tokens, G, N) with
        cu_seqlens (batch + 1,) and max_seqlen.
        state_batch_indices (batch,) int32 slot of each row (pad_slot_id: padding row, untouched).
    T <= 16, W <= 16. Rows with pnat + len > W (W = window, default L - T) store their folded state;
    the others leave it bit-identical. ring_start/pnat are updated by `SSMCache.commit` after
    verification.

    Options: launch "auto" | "dynamic" (one fused launch, each row branches) | "split" (coefficient
    kernel, then write and no-write mains over `plan`, a StepPlan built here when None; the plan also
    holds the launches' scratch, allocated at its first split step: run one step before capturing a
    CUDA graph); no_write_form "rectangle" | "replay" (the fused kernel); precision "fast" (tf32 where
    a product has fp32 operands) | "exact" (fp32 FMA); rounding "rn" | "sr" (needs rand_seed (slots,)
    int64); validate=False skips the host-side slot checks (needed inside CUDA graphs); pdl=True (CUDA)
    launches the first kernel with Programmatic Dependent Launch: it may start while the previous
    kernel (e.g. conv1d_update(pdl=True)) finishes. Ignored on the CPU.
    Rows whose slot id, pnat or ring_start break the contract (what validate=True rejects on the host)
    do no work and never touch memory outside the caches; with `faults` (SSMCache.faults, an int64 (1,)
    record) they are recorded: SSMCache.raise_if_faulted() names the first.

    Runs as the custom op `torch.ops.specssm.checkpointing_ssu` (specssm/library.py), so
    torch.compile(fullgraph=True) traces through it; the checks run inside the op, on every call. A
    compiled step passes only a plan scratch that exists when it is traced: run one eager step (or
    plan.scratch(nheads, act_dtype)) first.
    """
    if no_write_form not in ("rectangle", "replay"):
        raise ValueError(f"no_write_form: expected 'rectangle' or 'replay', got {no_write_form!r}")
    if launch not in LAUNCHES:
        raise ValueError(f"launch: expected one of {LAUNCHES}, got {launch!r}")
    library.call(
        "checkpointing_ssu", state=state, x_cache=x_cache, B_cache=B_cache, dt_cache=dt_cache,
        ring_start=ring_start, prev_num_accepted_tokens=prev_num_accepted_tokens, x=x, dt=dt, A=A, B=B, C=C,
        out=out, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices,
        pad_slot_id=pad_slot_id, state_scale=state_scale, rand_seed=rand_seed, philox_rounds=philox_rounds,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window, rounding=rounding,
        no_write_form=no_write_form, **_plan_arguments(plan, x, state, cu_seqlens, launch, no_write_form),
        launch=launch, precision=precision, validate=validate, pdl=pdl, faults=faults)
    return out


def _plan_arguments(plan, x, state, cu_seqlens, launch, no_write_form) -> dict:
    """The step op's view of `plan` (specssm/library.py): its tensors, its batch and its split-step
    scratch. The scratch is allocated here, eagerly, at the first step that splits: a torch.compile
    trace or a CUDA-graph capture passes only a scratch that already exists (without one, the op
    allocates a temporary one per step, which a capture refuses)."""
    if plan is None:
        return dict(plan_order=None, plan_slots=None, plan_counts=None, plan_batch=0, plan_coef=None,
                    plan_vec=None)
    coef = vec = None
    # an x the op's checks reject gets no scratch (their error, not one from allocating it)
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        H = x.shape[-2]
        if (not torch.compiler.is_compiling() and plan.allocated_scratch(H, x.dtype) is None
                and _split_writes_scratch(x, state, cu_seqlens, launch, no_write_form)):
            plan.scratch(H, x.dtype)
        coef, vec = plan.allocated_scratch(H, x.dtype) or (None, None)
    return dict(plan_order=plan.order, plan_slots=plan.slots, plan_counts=plan.counts, plan_batch=plan.batch,
                plan_coef=coef, plan_vec=vec)


def _split_writes_scratch(x, state, cu_seqlens, launch, no_write_form) -> bool:
    """Whether the step runs the split family's coefficient kernel (the rectangle form, split launch)."""
    if no_write_form != "rectangle" or launch == "dynamic":
        return False
    if not isinstance(state, torch.Tensor) or state.dim() != 4:      # the op's checks reject it
        return False
    batch = cu_seqlens.shape[0] - 1 if isinstance(cu_seqlens, torch.Tensor) else x.shape[0]
    if batch <= 0:
        return False
    return launch == "split" or reads_plan(batch, x.device, x.shape[-1], state.shape[-1], state.dtype, launch)
