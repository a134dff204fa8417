"""Offline sm_90 compiles of candidate launches: shared memory, registers and spills before any GPU time
is spent, in parallel worker processes (Triton compiles for a GPUTarget without a GPU).

A *job* is everything one compile needs, as JSON: kernel, pointer types, constexprs, runtime integers (for
the JIT's specialization: equal to 1, divisible by 16), num_warps, maxnreg. `job_for` builds the job of
one launch of a target exactly as specssm/step/launch.py would launch it in the tuner's step (bf16
activations, z, D, dt_bias, softplus, slot indices, contiguous caches, PDL chain on sm_90). `compile_jobs`
runs jobs in a child process (`python -m specssm.tune.offline`, without TRITON_INTERPRET, which would
turn the kernels into interpreter functions) that spreads them over a process pool; `report_reason` says
why a report rules a point out.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from specssm.tune.space import KIND, SM_REGISTERS, SM_SHARED, SM_WARPS, Target, effective, next_pow2

BLOCK_SHARED = 227 * 1024       # one block's limit on sm_90
RESERVED_SHARED = 1024          # the system's shared memory per resident block on sm_90
PTR_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "float8_e4m3fn": "fp8e4nv",
             "int16": "i16"}
TM, KH, VEC, CHUNK_N = 16, 16, 48, 32        # specssm/step/coef.py


def _ints(t: Target, n_progs: int) -> dict:
    """Runtime integers of the step kernels for contiguous caches and inputs of target t."""
    H, P, N, G, T = t.H, t.P, t.N, t.G, t.T
    L = t.W + T
    nk = 32
    return dict(batch=t.batch, T=T, W=t.W, L=L, pad_slot_id=-1, num_slots=4 * t.batch, max_pnat=max(t.W, T),
                H=H, P=P, N=N, HPG=t.hpg, n_progs=n_progs,
                s_st_s=H * P * N, s_st_h=P * N, s_st_p=N, s_sc_s=H * P, s_sc_h=P,
                s_xc_s=H * L * P, s_xc_h=L * P, s_xc_l=P, s_Bc_s=G * L * N, s_Bc_g=L * N, s_Bc_l=N,
                s_dtc_s=H * L, s_dtc_h=L, s_x_b=T * H * P, s_x_t=H * P, s_x_h=P, s_dt_b=T * H, s_dt_t=H,
                s_dt_h=1, s_B_b=T * G * N, s_B_t=G * N, s_B_g=N, s_C_b=T * G * N, s_C_t=G * N, s_C_g=N,
                s_o_b=T * H * P, s_o_t=H * P, s_o_h=P, s_z_b=T * H * P, s_z_t=H * P, s_z_h=P,
                s_cf_b=H * 2 * TM * nk, s_cf_h=2 * TM * nk, s_v_b=H * VEC, s_v_h=VEC)


def _pointers(t: Target, names) -> dict:
    act, st = "*bf16", "*" + PTR_TYPES[t.state]
    ptr = {n: "*fp32" for n in names if n.endswith("_ptr")}
    ptr.update({"xc_ptr": act, "Bc_ptr": act, "x_ptr": act, "B_ptr": act, "C_ptr": act, "out_ptr": act,
                "z_ptr": act, "coef_ptr": act, "ring_start_ptr": "*i32", "pnat_ptr": "*i32", "sbi_ptr": "*i32",
                "cu_ptr": "*i32", "order_ptr": "*i32", "slots_ptr": "*i32", "counts_ptr": "*i32",
                "seed_ptr": "*i64", "faults_ptr": "*i64", "state_ptr": st, "st_desc": st})
    return {n: v for n, v in ptr.items() if n in names}


def job_for(t: Target, launch: str, knobs: dict, fused_base: dict | None = None) -> dict:
    """The compile job of one launch ("coef", "write", "no_write", "fused", "fused.write",
    "fused.no_write") with these knobs for target t."""
    knobs = effective(launch, knobs, t)
    block_n = next_pow2(t.N)
    to = TM // 2 if t.T <= TM // 2 else TM
    cs16 = t.state in ("bfloat16", "int8", "float8_e4m3fn")      # C·Sᵀ on 16-bit operands (bf16 C)
    kind, sr = KIND[t.state], t.rounding == "sr"
    if launch == "coef":
        kernel, names = "coef", _COEF_ARGS
        cx = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, VARLEN=False, WAIT=False, LAUNCH_DEPS=True,
                  UPCAST=False, HB=knobs["HB"], EVEN_N=t.N == block_n, BLOCK_N=block_n,
                  CHUNK_N=min(CHUNK_N, block_n), TO=to)
        n_progs = 1
    elif launch in ("write", "no_write"):
        kernel, names = "main", _MAIN_ARGS
        bp = knobs["BLOCK_P"]
        cx = dict(H=t.H, P=t.P, N=t.N, HPG=t.hpg, WRITE=launch == "write", HAS_Z=True, VARLEN=False, KIND=kind,
                  CS16=cs16, SR=sr, SR_ROWS=block_n % 4 == 0, PHILOX_ROUNDS=10, TMA=knobs["tma"], PDL=True,
                  LAUNCH_DEPS=launch == "write", UPCAST=False, DOT_PREC="tf32", BLOCK_P=bp, BLOCK_N=block_n,
                  TM=TM, TO=to, STAGES=knobs["stages"], COL_SPLIT=knobs.get("col_split", 1),
                  PREFETCH=knobs.get("prefetch", False))
        n_tiles = t.batch * -(-t.P // bp) * t.H
        n_progs = max(1, min(n_tiles, knobs["ctas_per_sm"] * t.num_sms))
    else:
        kernel, names = "fused", _FUSED_ARGS
        if launch != "fused":
            knobs = {**(fused_base or {"BLOCK_P": 64}), **knobs}
        bp = min(knobs["BLOCK_P"], max(16, next_pow2(t.P)), max(16, 8192 // block_n))
        tn = max(knobs["TN_MIN"], next_pow2(t.T))
        rect = launch == "fused"
        cx = dict(BRANCH={"fused": 0, "fused.write": 1, "fused.no_write": 2}[launch], RECT=rect, HAS_D=True,
                  HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, VARLEN=False, HAS_SBI=True, USE_ORDER=not rect,
                  EVEN_TILE=t.P % bp == 0 and t.N == block_n, TMA=knobs["tma"], KIND=kind, SR=sr,
                  SR_ROWS=block_n % 4 == 0, PHILOX_ROUNDS=10, BLOCK_P=bp, BLOCK_N=block_n, KH=KH, TN=tn,
                  NK=next_pow2(KH + tn), DOT_PREC="tf32", NATIVE_CS=cs16 and rect, PDL=False, UPCAST=False)
        n_progs = 1
    ints = {k: v for k, v in _ints(t, n_progs).items() if k in names and k not in cx}
    ptr = _pointers(t, names)
    if cx.get("TMA"):
        ptr["st_desc"] = f"tensordesc<{PTR_TYPES[t.state]}[1,1,{cx['BLOCK_P']},{block_n // cx.get('COL_SPLIT', 1)}]>"
    return {"kernel": kernel, "pointers": ptr, "constexprs": cx, "ints": ints, "num_warps": knobs["num_warps"],
            "maxnreg": knobs.get("maxnreg")}


def job_key(job: dict) -> str:
    return hashlib.sha1(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


# argument names of the kernels (kept here so building a job imports no Triton kernel)
_COEF_ARGS = ("pnat_ptr", "ring_start_ptr", "order_ptr", "slots_ptr", "counts_ptr", "cu_ptr", "dt_ptr", "dt_bias_ptr",
              "A_ptr", "D_ptr", "B_ptr", "C_ptr", "Bc_ptr", "dtc_ptr", "coef_ptr", "vec_ptr", "batch", "T", "L",
              "N", "HPG", "s_dt_b", "s_dt_t", "s_dt_h", "s_B_b", "s_B_t", "s_B_g", "s_Bc_s", "s_Bc_g", "s_Bc_l",
              "s_dtc_s", "s_dtc_h", "s_cf_b", "s_cf_h", "s_v_b", "s_v_h")
_MAIN_ARGS = ("state_ptr", "st_desc", "scale_ptr", "xc_ptr", "Bc_ptr", "ring_start_ptr", "pnat_ptr", "x_ptr", "C_ptr",
              "out_ptr", "z_ptr", "coef_ptr", "vec_ptr", "order_ptr", "slots_ptr", "counts_ptr", "cu_ptr", "seed_ptr",
              "batch", "T", "L", "n_progs", "s_st_s", "s_st_h", "s_st_p", "s_sc_s", "s_sc_h", "s_xc_s", "s_xc_h",
              "s_xc_l", "s_Bc_s", "s_Bc_g", "s_Bc_l", "s_x_b", "s_x_t", "s_x_h", "s_C_b", "s_C_t", "s_C_g", "s_o_b",
              "s_o_t", "s_o_h", "s_z_b", "s_z_t", "s_z_h", "s_cf_b", "s_cf_h", "s_v_b", "s_v_h")
_FUSED_ARGS = ("state_ptr", "scale_ptr", "xc_ptr", "Bc_ptr", "dtc_ptr", "ring_start_ptr", "pnat_ptr", "x_ptr",
               "dt_ptr", "A_ptr", "B_ptr", "C_ptr", "out_ptr", "D_ptr", "z_ptr", "dt_bias_ptr", "sbi_ptr", "cu_ptr",
               "order_ptr", "slots_ptr", "counts_ptr", "seed_ptr", "st_desc", "batch", "T", "W", "L",
               "pad_slot_id", "num_slots", "max_pnat", "faults_ptr", "H", "P", "N", "HPG", "NPT", "s_st_s", "s_st_h",
               "s_st_p", "s_sc_s", "s_sc_h", "s_xc_s", "s_xc_h", "s_xc_l", "s_Bc_s", "s_Bc_g", "s_Bc_l", "s_dtc_s",
               "s_dtc_h", "s_x_b", "s_x_t", "s_x_h", "s_dt_b", "s_dt_t", "s_dt_h", "s_B_b", "s_B_t", "s_B_g",
               "s_o_b", "s_o_t", "s_o_h", "s_z_b", "s_z_t", "s_z_h")


def report_reason(report: dict, launch: str, knobs: dict, max_spill: int = 0) -> str | None:
    """Why a compile report rules out a launch with these knobs (None: keep it): a failed compile,
    spills above `max_spill` bytes per thread, a block over 227 KiB of shared memory; persistent mains
    must also fit ctas_per_sm programs on one SM (shared memory with the system's 1 KiB per block,
    registers allocated per warp in units of 256)."""
    if not report.get("ok"):
        return f"{launch}: compile failed: {report.get('error', '?')[:120]}"
    if report["spill"] > max_spill:
        return f"{launch}: spills {report['spill']} bytes per thread at {report['regs']} registers"
    shared = report["shared"]
    if shared > BLOCK_SHARED:
        return f"{launch}: {shared} bytes of shared memory exceed a block's {BLOCK_SHARED}"
    if launch in ("write", "no_write"):
        ctas, warps = knobs["ctas_per_sm"], knobs["num_warps"]
        if ctas * (shared + RESERVED_SHARED) > SM_SHARED:
            return f"{launch}: {ctas} programs x {shared} + {RESERVED_SHARED} bytes exceed {SM_SHARED} of shared memory"
        per_warp = -(-report["regs"] * 32 // 256) * 256
        if ctas * warps * per_warp > SM_REGISTERS:
            return f"{launch}: {ctas} programs x {warps} warps at {report['regs']} registers exceed {SM_REGISTERS}"
        if ctas * warps > SM_WARPS:
            return f"{launch}: {ctas} programs x {warps} warps exceed {SM_WARPS}"
    return None


def compile_jobs(jobs: list[dict], workers: int | None = None, timeout: float = 600) -> list[dict]:
    """Reports of the jobs, compiled in a child process over `workers` processes: {"ok", "shared",
    "regs", "spill", "error", "loads_before_wait", "prefetches_before_wait"}."""
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "specssm.tune.offline", "--workers", str(workers or os.cpu_count() or 1)]
    r = subprocess.run(cmd, input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"offline compile: the worker exited with {r.returncode}: {r.stderr[-800:]}")
    return json.loads(r.stdout)


def _kernel(name):
    if name == "coef":
        from specssm.step.coef import coef_kernel
        return coef_kernel
    if name == "main":
        from specssm.step.mains import main_kernel
        return main_kernel
    from specssm.step.fused import fused_kernel
    return fused_kernel


def _usage(cubin: bytes) -> dict:
    """Registers, spill (local memory) bytes per thread and static shared memory off the cubin."""
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool if os.path.exists(tool) else "cuobjdump", "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    fields = {}
    for tok in out.replace(",", " ").split():
        name, _, value = tok.partition(":")
        if value.isdigit() and name in ("REG", "STACK", "SHARED", "LOCAL"):
            fields[name] = int(value)
    return fields


def before_wait(ptx: str, what: tuple) -> int | None:
    """PTX lines holding any of `what` before the kernel's first griddepcontrol.wait (None: it never
    waits)."""
    head, sep, _ = ptx.partition("griddepcontrol.wait")
    if not sep:
        return None
    return sum(1 for line in head.splitlines() if any(w in line for w in what))


def loads_before_wait(ptx: str) -> int | None:
    """Global loads (ld.global, cp.async, TMA) a kernel issues before its first griddepcontrol.wait
    (None: it never waits). With PDL, anything the previous kernel writes must be read after the wait;
    the software pipeline hoists a loop's first loads into its prologue, ahead of a wait in the body."""
    return before_wait(ptx, ("ld.global", "cp.async.ca", "cp.async.cg", "cp.async.bulk.tensor"))


def compile_one(job: dict) -> dict:
    """One job compiled for sm_90 (in a worker; needs a Triton that is not interpreting)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    try:
        fn = _kernel(job["kernel"])
        sig, consts, attrs = {}, dict(job["constexprs"]), {}
        ints = job["ints"]
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in job["pointers"]:
                sig[name] = job["pointers"][name]
                if not sig[name].startswith("tensordesc"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif ints.get(name) == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if name in ints and ints[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        options = {"num_warps": job["num_warps"], **({"maxnreg": job["maxnreg"]} if job["maxnreg"] else {})}
        k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                           options=options)
        use = _usage(k.asm["cubin"])
        return {"ok": True, "shared": int(k.metadata.shared) + use.get("SHARED", 0), "regs": use.get("REG", 0),
                "spill": use.get("LOCAL", 0) + use.get("STACK", 0), "error": "",
                "loads_before_wait": loads_before_wait(k.asm["ptx"]),
                "prefetches_before_wait": before_wait(k.asm["ptx"], ("prefetch.global",))}
    except Exception as e:  # noqa: BLE001 - a point that does not compile is pruned, not fatal
        return {"ok": False, "shared": 0, "regs": 0, "spill": 0, "error": f"{type(e).__name__}: {e}"[:400],
                "loads_before_wait": None, "prefetches_before_wait": None}


def main(argv=None) -> int:
    import argparse
    from concurrent.futures import ProcessPoolExecutor
    ap = argparse.ArgumentParser(prog="python -m specssm.tune.offline",
                                 description="compile step-kernel jobs (JSON list on stdin) for sm_90")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    a = ap.parse_args(argv)
    jobs = json.loads(sys.stdin.read())
    if a.workers <= 1 or len(jobs) <= 1:
        reports = [compile_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(a.workers, len(jobs))) as pool:
            reports = list(pool.map(compile_one, jobs))
    json.dump(reports, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
