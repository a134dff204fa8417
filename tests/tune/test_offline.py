"""Offline sm_90 compiles for pruning (specssm/tune/offline.py): jobs carry the launcher's choices,
reports rule points out by hand-computed residency limits, and one real compile in a worker process
(no GPU: Triton compiles for a GPUTarget) reports registers and shared memory or the compile error."""
import pytest

from specssm.tune import offline
from specssm.tune.space import Target


def tgt(state="float32", T=6, batch=1024, H=16, G=1):
    return Target(state, "rn", T, 16, H, 64, 128, G, batch, 132)


MAIN = {"BLOCK_P": 64, "num_warps": 4, "stages": 2, "ctas_per_sm": 4, "tma": True, "maxnreg": None}


def test_jobs_carry_what_the_launcher_launches():
    job = offline.job_for(tgt(), "write", MAIN)
    cx = job["constexprs"]
    assert job["kernel"] == "main" and job["num_warps"] == 4 and job["maxnreg"] is None
    assert (cx["BLOCK_P"], cx["BLOCK_N"], cx["TO"], cx["STAGES"], cx["WRITE"], cx["TMA"], cx["KIND"]) == \
        (64, 128, 8, 2, True, True, 0)
    assert job["ints"]["n_progs"] == 4 * 132, "min(1024 x 16 tiles, 4 programs x 132 SMs)"
    assert job["pointers"]["st_desc"] == "tensordesc<fp32[1,1,64,128]>"
    assert job["ints"]["s_st_s"] == 16 * 64 * 128 and job["ints"]["s_xc_h"] == 22 * 64, "L = W + T = 22"
    nw = offline.job_for(tgt("int8", batch=1), "no_write", dict(MAIN, tma=False))
    assert nw["constexprs"]["CS16"] and not nw["constexprs"]["TMA"] and nw["pointers"]["st_desc"] == "*i8"
    assert nw["ints"]["n_progs"] == 16 and nw["ints"]["batch"] == 1
    coef = offline.job_for(tgt(H=16, G=8), "coef", {"HB": 8, "num_warps": 2})
    assert coef["constexprs"]["HB"] == 2, "HB runs as the largest power of two dividing H/G"
    fused = offline.job_for(tgt(T=12), "fused", {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "TN_MIN": 8,
                                                 "tma": False})
    assert (fused["constexprs"]["TN"], fused["constexprs"]["NK"], fused["constexprs"]["RECT"]) == (16, 32, True)
    rep = offline.job_for(tgt(), "fused.no_write", {"num_warps": 8, "maxnreg": 96, "tma": False, "TN_MIN": 16},
                          {"BLOCK_P": 32})
    assert (rep["constexprs"]["BRANCH"], rep["constexprs"]["BLOCK_P"], rep["constexprs"]["RECT"],
            rep["constexprs"]["USE_ORDER"], rep["maxnreg"]) == (2, 32, False, True, 96)
    assert offline.job_key(job) == offline.job_key(offline.job_for(tgt(), "write", dict(MAIN)))
    assert offline.job_key(job) != offline.job_key(offline.job_for(tgt(), "write", dict(MAIN, stages=3)))


def _rep(shared=43048, regs=128, spill=0, ok=True):
    return {"ok": ok, "shared": shared, "regs": regs, "spill": spill, "error": "" if ok else "CompilationError: x"}


@pytest.mark.parametrize("report,knobs,reason", [
    (_rep(), MAIN, None),
    # 4 x (86132 + 1024) = 348624 > 233472
    (_rep(shared=86132), MAIN, "write: 4 programs x 86132 + 1024 bytes exceed 233472 of shared memory"),
    (_rep(shared=86132), dict(MAIN, ctas_per_sm=2), None),
    # 128 registers: 4096 per warp, 4 x 4 x 4096 = 65536 fits; 130: 4160 -> 4352 per warp, 69632 does not
    (_rep(regs=130), MAIN, "write: 4 programs x 4 warps at 130 registers exceed 65536"),
    (_rep(spill=600), MAIN, "write: spills 600 bytes per thread at 128 registers"),
    (_rep(spill=400), MAIN, None),
    (_rep(shared=240000), dict(MAIN, ctas_per_sm=1), "write: 240000 bytes of shared memory exceed a block's 232448"),
    (_rep(ok=False), MAIN, "write: compile failed: CompilationError: x"),
])
def test_report_reasons(report, knobs, reason):
    assert offline.report_reason(report, "write", knobs, max_spill=512) == reason


def test_real_compile_in_a_worker():
    ok = offline.job_for(tgt("bfloat16"), "coef", {"HB": 4, "num_warps": 1})
    bad = offline.job_for(tgt("bfloat16"), "coef", {"HB": 4, "num_warps": 1})
    bad["constexprs"]["HB"] = 3          # tl.arange needs a power of two
    good, broken = offline.compile_jobs([ok, bad], workers=2)
    assert good["ok"] and good["regs"] > 0 and good["shared"] > 0 and good["spill"] >= 0, good
    assert not broken["ok"] and "CompilationError" in broken["error"] and broken["regs"] == 0


def test_job_argument_names_are_the_kernels():
    """The jobs name the kernels' runtime arguments without importing them: a kernel signature change
    must show here, not as a worker's compile failure on the GPU."""
    import inspect

    from specssm.step.coef import coef_kernel
    from specssm.step.fused import fused_kernel
    from specssm.step.mains import main_kernel
    for names, kernel in ((offline._COEF_ARGS, coef_kernel), (offline._MAIN_ARGS, main_kernel),
                          (offline._FUSED_ARGS, fused_kernel)):
        params = inspect.signature(kernel.fn).parameters.values()
        runtime = tuple(p.name for p in params if "constexpr" not in str(p.annotation))
        assert names == runtime, f"{kernel.fn.__name__}: {set(names) ^ set(runtime)}"


def test_mirrored_constants_match_the_coefficient_kernel():
    # offline.py keeps copies so building a job imports no kernel; they must be the kernel module's
    from specssm.step import coef
    assert (offline.TM, offline.KH, offline.VEC, offline.CHUNK_N) == (int(coef.TM), int(coef.KH), coef.VEC,
                                                                      coef.CHUNK_N)


def test_mirrored_state_codes_match_the_store():
    from specssm.step.store import STATE_KIND
    from specssm.tune.space import KIND
    assert KIND == {str(dtype).replace("torch.", ""): code for dtype, code in STATE_KIND.items()}


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("state", ["float32", "bfloat16", "int8"])
def test_mains_read_nothing_of_the_coefficient_kernel_before_waiting(state, prefetch):
    """Launched as PDL dependents of the coefficient kernel, the mains may issue no load before
    griddepcontrol.wait but the plan's counts and, with prefetch, the slot of each prefetched tile
    (all written before the coefficient kernel started): a wait inside the persistent loop let the
    software pipeline load the first tiles' coefficients and C ahead of it (stale coefficients once
    launches follow each other without a host gap, as in a CUDA graph). With prefetch, the first two
    tiles' state lines are requested into L2 before the wait."""
    knobs = dict(MAIN, stages=2, prefetch=prefetch)
    jobs = [offline.job_for(tgt(state), launch, knobs) for launch in ("write", "no_write")]
    for launch, rep in zip(("write", "no_write"), offline.compile_jobs(jobs, workers=2)):
        assert rep["ok"], rep["error"]
        assert rep["loads_before_wait"] is not None and rep["loads_before_wait"] <= 2 + 2 * prefetch, (launch, rep)
        assert (rep["prefetches_before_wait"] > 0) == prefetch, (launch, rep)


def test_loads_before_wait_counts_global_loads_and_copies():
    ptx = "\n".join(["ld.global.b32 {%r1}, [%rd1];", "cp.async.cg.shared.global [%r2], [%rd2], 0x10;",
                     "cp.async.commit_group;", "cp.async.wait_group 0;",
                     "cp.async.bulk.tensor.4d.shared::cluster.global [%r3], [%rd3];", "griddepcontrol.wait;",
                     "ld.global.b32 {%r4}, [%rd4];"])
    assert offline.loads_before_wait(ptx) == 3
    assert offline.loads_before_wait("ld.global.b32 {%r1}, [%rd1];") is None
