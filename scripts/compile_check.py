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


def signature_of(fn, dtypes: dict, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = dtypes.get(name, "i32")
    return sig


def compile_one(fn, dtypes, constexprs, num_warps=4, label=""):
    src = ASTSource(fn, signature_of(fn, dtypes, constexprs), constexprs=constexprs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps))
    md = k.metadata
    usage = "?"
    try:  # cuobjdump reads registers / spill stores off the cubin
        import subprocess, tempfile
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            tool = tool if os.path.exists(tool) else "cuobjdump"     # Triton ships one
            r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage = " ".join(l.strip() for l in r.stdout.splitlines() if "REG" in l)
    except Exception as e:  # noqa: BLE001
        usage = f"(no cuobjdump: {e})"
    print(f"{label:32s} shared {md.shared:6d}  {usage}")
    return k


def compile_plan():
    """The StepPlan kernel at its smallest and largest usual blocks, fixed and varlen lengths."""
    from specssm.cache.plan_kernel import _plan_kernel, _num_warps
    ptr = {"pnat_ptr": "*i32", "sbi_ptr": "*i32", "lens_ptr": "*i32", "write_flag_ptr": "*i32",
           "order_ptr": "*i32", "counts_ptr": "*i32"}
    for block in (1, 4096):
        for varlen in (False, True):
            compile_one(_plan_kernel, ptr, dict(VARLEN=varlen, BLOCK=block), num_warps=_num_warps(block),
                        label=f"plan block={block} varlen={varlen}")


def main():
    compile_plan()
    from specssm.ops.checkpointing import _ssu_kernel
    ptr = {n: "*fp32" for n in _ssu_kernel.arg_names if n.endswith("_ptr")}
    ptr.update({"xc_ptr": "*bf16", "Bc_ptr": "*bf16", "x_ptr": "*bf16", "B_ptr": "*bf16", "C_ptr": "*bf16",
                "out_ptr": "*bf16", "z_ptr": "*bf16", "ring_start_ptr": "*i32", "pnat_ptr": "*i32",
                "sbi_ptr": "*i32", "cu_ptr": "*i32", "order_ptr": "*i32", "counts_ptr": "*i32", "seed_ptr": "*i64"})
    base = dict(RECT=True, HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, VARLEN=False, HAS_SBI=True,
                KIND=0, SR=False, PHILOX_ROUNDS=10, BLOCK_P=64, BLOCK_N=128, KH=16, TN=16, DOT_PREC="tf32",
                HC=1, STAGES=1, NCH=64)
    for branch, use_order, rect in ((0, False, True), (1, True, True), (2, True, True), (2, True, False)):
        cx = dict(base, BRANCH=branch, USE_ORDER=use_order, RECT=rect)
        compile_one(_ssu_kernel, ptr, cx, label=f"ssu branch={branch} rect={rect}")
    # the rounded and quantized store paths (write branch)
    for kind, sdt, sr in ((1, "*bf16", True), (2, "*fp16", False), (3, "*i8", True), (4, "*fp8e4nv", False)):
        cx = dict(base, BRANCH=1, USE_ORDER=True, KIND=kind, SR=sr, NCH=128)
        compile_one(_ssu_kernel, dict(ptr, state_ptr=sdt), cx, label=f"ssu store kind={kind} sr={sr}")
    from specssm.ops.baselines import _all_states_kernel
    ptr2 = {n: "*fp32" for n in _all_states_kernel.arg_names if n.endswith("_ptr")}
    ptr2.update({"x_ptr": "*bf16", "B_ptr": "*bf16", "C_ptr": "*bf16", "out_ptr": "*bf16", "z_ptr": "*bf16",
                 "index_ptr": "*i32", "sbi_ptr": "*i32"})
    compile_one(_all_states_kernel, ptr2, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_SBI=True,
                                               BLOCK_P=64, BLOCK_N=128), label="all_states")


if __name__ == "__main__":
    main()
