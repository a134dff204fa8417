"""Compile the Triton kernels for sm_90 on a machine without a GPU (catches compile errors and
reports registers/spills before spending device time).  usage: python scripts/compile_check.py"""
from __future__ import annotations

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = GPUTarget("cuda", 90, 32)


def signature_of(fn, dtypes: dict, constexprs: dict, ints: dict | None = None):
    """Signature, constants and attributes as the JIT would specialize them: pointers 16-byte aligned,
    the integers in `ints` (realistic values) divisible by 16 where they are, and those equal to 1
    compiled in as constants. Integers not in `ints` are left unspecialized."""
    sig, consts, attrs = {}, dict(constexprs), {}
    ints = ints or {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in dtypes:
            sig[name] = dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints.get(name) == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name in ints and ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_one(fn, dtypes, constexprs, num_warps=4, label="", ints=None, maxnreg=None):
    sig, consts, attrs = signature_of(fn, dtypes, constexprs, ints)
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {}))
    k = triton.compile(src, target=TARGET, options=options)
    md = k.metadata
    usage = "?"
    try:  # cuobjdump reads registers / spill stores off the cubin
        import subprocess
        import tempfile
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            tool = tool if os.path.exists(tool) else "cuobjdump"     # Triton ships one
            r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage = " ".join(line.strip() for line in r.stdout.splitlines() if "REG" in line)
    except Exception as e:  # noqa: BLE001
        usage = f"(no cuobjdump: {e})"
    print(f"{label:32s} shared {md.shared:6d}  {usage}")
    return k


def compile_plan():
    """The StepPlan kernel at its smallest and largest usual blocks, fixed and varlen lengths."""
    from specssm.cache.plan_kernel import _num_warps, _plan_kernel
    ptr = {"pnat_ptr": "*i32", "sbi_ptr": "*i32", "lens_ptr": "*i32", "write_flag_ptr": "*i32",
           "order_ptr": "*i32", "slots_ptr": "*i32", "counts_ptr": "*i32", "rs_ptr": "*i32", "faults_ptr": "*i64"}
    for block in (1, 4096):
        for varlen in (False, True):
            compile_one(_plan_kernel, ptr, dict(VARLEN=varlen, CHECK_RING=not varlen, BLOCK=block),
                        num_warps=_num_warps(block), label=f"plan block={block} varlen={varlen} checks={not varlen}")


def compile_conv():
    """The conv1d update at the Super TP8 step (bf16, T=6, d_conv 4), without and with PDL."""
    from specssm.conv.conv1d import _conv1d_update_kernel
    ptr = {"xbc_ptr": "*bf16", "state_ptr": "*bf16", "offset_ptr": "*i32", "weight_ptr": "*bf16",
           "bias_ptr": "*bf16", "out_ptr": "*bf16", "slot_idx_ptr": "*i32"}
    # contiguous (batch, 6, 1280) inputs/outputs, (slots, 3 + 6, 1280) state, (1280, 4) weight
    ints = dict(conv_dim=1280, pad_slot_id=-1, num_slots=1024, max_offset=6, stride_x_row=7680, stride_x_tok=1280,
                stride_x_ch=1, stride_s_slot=11520, stride_s_row=1280, stride_s_ch=1, stride_w_ch=4, stride_w_tap=1,
                stride_o_row=7680, stride_o_tok=1280, stride_o_ch=1)
    for pdl in (False, True):
        cx = dict(T=6, D_CONV=4, T_PAD=8, CTX_PAD=4, HAS_BIAS=True, HAS_SLOT_IDX=True, SILU=True, BLOCK_C=128,
                  PDL=pdl)
        k = compile_one(_conv1d_update_kernel, ptr, cx, num_warps=4, label=f"conv1d pdl={pdl}", ints=ints)
        assert ("griddepcontrol.launch_dependents" in k.asm["ptx"]) == pdl, "PDL flag not honoured"


# the step kernels' integer arguments at Super TP8 (H=16, P=64, N=128, G=1, T=6, W=16, L=22), batch 1024,
# contiguous caches, x/z/out (batch, T, H, P), B/C (batch, T, G, N), dt (batch, T, H), the plan's scratch
SSU_INTS = dict(batch=1024, T=6, W=16, L=22, pad_slot_id=-1, H=16, P=64, N=128, HPG=16, NPT=1, n_progs=528,
                s_st_s=131072, s_st_h=8192, s_st_p=128, s_sc_s=1024, s_sc_h=64,
                s_xc_s=22528, s_xc_h=1408, s_xc_l=64, s_Bc_s=2816, s_Bc_g=2816, s_Bc_l=128,
                s_dtc_s=352, s_dtc_h=22, s_x_b=6144, s_x_t=1024, s_x_h=64, s_dt_b=96, s_dt_t=16, s_dt_h=1,
                s_B_b=768, s_B_t=128, s_B_g=128, s_C_b=768, s_C_t=128, s_C_g=128, s_o_b=6144, s_o_t=1024, s_o_h=64,
                s_z_b=6144, s_z_t=1024, s_z_h=64, s_cf_b=16384, s_cf_h=1024, s_v_b=768, s_v_h=48)
STATES = {"fp32": (0, "*fp32"), "bf16": (1, "*bf16"), "fp16": (2, "*fp16"), "int8": (3, "*i8"),
          "fp8": (4, "*fp8e4nv")}


def ints_of(fn):
    """SSU_INTS restricted to fn's runtime integer arguments (the rest may be constexprs there)."""
    return {k: v for k, v in SSU_INTS.items() if k in fn.arg_names}


def ssu_pointers(fn, state="*fp32"):
    """Pointer types of a step kernel's arguments: bf16 activations, rings and coefficient scratch, int32
    metadata, a state pool of type `state` (st_desc: the pool itself, unless TMA makes it a descriptor)."""
    ptr = {n: "*fp32" for n in fn.arg_names if n.endswith("_ptr")}
    ptr.update({"xc_ptr": "*bf16", "Bc_ptr": "*bf16", "x_ptr": "*bf16", "B_ptr": "*bf16", "C_ptr": "*bf16",
                "out_ptr": "*bf16", "z_ptr": "*bf16", "coef_ptr": "*bf16", "ring_start_ptr": "*i32",
                "pnat_ptr": "*i32", "sbi_ptr": "*i32", "cu_ptr": "*i32", "order_ptr": "*i32", "slots_ptr": "*i32",
                "counts_ptr": "*i32", "seed_ptr": "*i64", "state_ptr": state, "st_desc": state})
    return {n: t for n, t in ptr.items() if n in fn.arg_names}


# the fused kernel's constexprs for its default variant (fp32 state, rectangle form, token tile 8)
SSU_BASE = dict(RECT=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, VARLEN=False, HAS_SBI=True,
                EVEN_TILE=True, TMA=False, KIND=0, SR=False, SR_ROWS=True, PHILOX_ROUNDS=10, BLOCK_P=64, BLOCK_N=128,
                KH=16, TN=8, NK=32, DOT_PREC="tf32", NATIVE_CS=False, PDL=False, UPCAST=False)
# the coefficient kernel's and the mains' (Super TP8, T = 6: 8 query rows)
COEF_BASE = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, VARLEN=False, WAIT=False,
                 LAUNCH_DEPS=True, UPCAST=False, HB=8, EVEN_N=True, BLOCK_N=128, CHUNK_N=32, TO=8)
MAIN_BASE = dict(H=16, P=64, N=128, HPG=16, WRITE=False, HAS_Z=True, VARLEN=False, KIND=0, CS16=False, SR=False,
                 SR_ROWS=True, PHILOX_ROUNDS=10, TMA=True, PDL=True, LAUNCH_DEPS=False, UPCAST=False,
                 DOT_PREC="tf32", BLOCK_P=64, BLOCK_N=128, TM=16, TO=8, STAGES=2, COL_SPLIT=1,
                 PREFETCH=False)


def compile_main(state="fp32", num_warps=4, maxnreg=None, label=None, **cx):
    """The main kernel for a state dtype (16-bit C·Sᵀ where exact under bf16 activations), TMA descriptor
    pointer types when cx asks for TMA."""
    from specssm.step.mains import main_kernel
    kind, sdt = STATES[state]
    cx = dict(MAIN_BASE, KIND=kind, CS16=kind in (1, 3, 4), **cx)
    ptr = ssu_pointers(main_kernel, sdt)
    if cx["TMA"]:
        ptr["st_desc"] = f"tensordesc<{sdt[1:]}[1,1,{cx['BLOCK_P']},{cx['BLOCK_N']}]>"
    return compile_one(main_kernel, ptr, cx, num_warps=num_warps, ints=ints_of(main_kernel), maxnreg=maxnreg,
                       label=label or f"main {state} write={cx['WRITE']} tma={cx['TMA']} warps={num_warps}")


def compile_coef(num_warps=2, label=None, maxnreg=None, **cx):
    from specssm.step.coef import coef_kernel
    cx = dict(COEF_BASE, **cx)
    return compile_one(coef_kernel, ssu_pointers(coef_kernel), cx, num_warps=num_warps, ints=ints_of(coef_kernel),
                       maxnreg=maxnreg, label=label or f"coef HB={cx['HB']} warps={num_warps}")


def compile_materialize(state="fp32", sr=False, num_warps=None, label=None):
    """The materialize kernel at Super TP8 (bf16 rings, one 64 x 128 tile per head), at the launcher's
    warps unless num_warps is given."""
    from specssm.step.materialize import FOLD_WARPS, materialize_kernel
    num_warps = num_warps or FOLD_WARPS["sr" if sr else "rn"]
    kind, sdt = STATES[state]
    ptr = ssu_pointers(materialize_kernel, sdt)
    ptr.update({"dtc_ptr": "*fp32", "A_ptr": "*fp32", "src_ptr": "*i32", "dst_ptr": "*i32", "k_ptr": "*i32",
                "rs_ptr": "*i32"})
    cx = dict(H=16, P=64, N=128, HPG=16, NPT=1, KIND=kind, SR=sr, SR_ROWS=True, PHILOX_ROUNDS=10, UPCAST=False,
              BLOCK_P=64, BLOCK_N=128, KH=16)
    return compile_one(materialize_kernel, ptr, cx, num_warps=num_warps, ints=dict(ints_of(materialize_kernel), s_A=1),
                       label=label or f"materialize {state}{' sr' if sr else ''}")


def compile_pairs():
    """materialize's pair launches: the checks and clash test over 1,024 pairs, then the metadata."""
    from specssm.step.materialize import PAIR_BLOCK, PAIR_CHUNK, finish_kernel, pairs_kernel
    ptr = {"src_ptr": "*i32", "dst_ptr": "*i32", "k_ptr": "*i32", "pnat_ptr": "*i32", "rs_ptr": "*i32",
           "faults_ptr": "*i64", "out_ptr": "*i32"}
    ints = dict(n=1024, num_slots=2048, pad_slot_id=-1, max_pnat=16, L=22, k_value=0)
    compile_one(pairs_kernel, ptr, dict(K_MODE=0, BLOCK=PAIR_BLOCK, BLOCK_J=PAIR_CHUNK), ints=ints,
                label="materialize pairs")
    compile_one(finish_kernel, {"pairs_ptr": "*i32", "pnat_ptr": "*i32", "rs_ptr": "*i32", "seed_ptr": "*i64"},
                dict(BLOCK=PAIR_BLOCK), ints=dict(n=1024), label="materialize finish")


def main():
    compile_plan()
    compile_conv()
    for state in STATES:
        compile_materialize(state)
    for state in ("bf16", "int8", "fp8"):
        compile_materialize(state, sr=True)
    compile_pairs()
    from specssm.step.fused import fused_kernel
    ptr, base, ints = ssu_pointers(fused_kernel), SSU_BASE, ints_of(fused_kernel)
    for branch, use_order, rect in ((0, False, True), (2, True, False)):
        cx = dict(base, BRANCH=branch, USE_ORDER=use_order, RECT=rect)
        compile_one(fused_kernel, ptr, cx, label=f"fused branch={branch} rect={rect}", ints=ints, maxnreg=168)
    for kind, sdt in ((1, "*bf16"), (3, "*i8"), (4, "*fp8e4nv")):       # the dynamic launch, 16-bit C·Sᵀ
        cx = dict(base, BRANCH=0, USE_ORDER=False, KIND=kind, NATIVE_CS=True)
        compile_one(fused_kernel, ssu_pointers(fused_kernel, sdt), cx, label=f"fused kind={kind} native",
                    ints=ints, maxnreg=128)
    compile_coef()
    compile_coef(WAIT=True, label="coef pdl wait")
    for state in STATES:
        for write in (False, True):
            compile_main(state, WRITE=write)
    compile_main("fp32", WRITE=True, TMA=False, label="main fp32 write pointer loads")
    compile_main("bf16", BLOCK_P=32, label="main bf16 BLOCK_P 32")
    # the rounded and quantized store paths of the write main: SR by rows (one Philox per four
    # elements, the default) and by element (unaligned pools)
    for state, rows in (("bf16", True), ("bf16", False), ("int8", True), ("int8", False), ("fp8", True)):
        compile_main(state, WRITE=True, SR=True, SR_ROWS=rows,
                     label=f"main {state} write sr{'' if rows else ' by element'}")
    from specssm.step.baselines import _all_states_kernel
    ptr2 = {n: "*fp32" for n in _all_states_kernel.arg_names if n.endswith("_ptr")}
    ptr2.update({"x_ptr": "*bf16", "B_ptr": "*bf16", "C_ptr": "*bf16", "out_ptr": "*bf16", "z_ptr": "*bf16",
                 "index_ptr": "*i32", "sbi_ptr": "*i32"})
    compile_one(_all_states_kernel, ptr2, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SBI=True,
                                               BLOCK_P=64, BLOCK_N=128), label="all_states")


if __name__ == "__main__":
    main()
