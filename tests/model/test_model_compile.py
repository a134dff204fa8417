"""torch.compile(fullgraph=True) of the decode step through the specssm custom ops: compiled == eager
bit for bit (outputs and every cache tensor) across steps whose write mix changes, no graph breaks, no
recompiles; tied / compact / varlen forms; the checks still run inside a compiled step; the demo's
--compile. CPU (interpreter, tiny shapes) and `-m gpu` (plus mode="reduce-overhead": CUDA graphs)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from specssm.cache import StepPlan
from specssm.model import SIZES, TinyMamba2LM
from specssm.ops import checkpointing_ssu
from tests.helpers.steps import make_step, to_device

TINY = SIZES["tiny"]
T, W = 4, 6                    # a row writes when pnat + 4 > 6
# accepted tokens per step of rows (slot a, padding, slot b) and the rows that write at each step: from
# pnat (0, 0) the mixes are {}, {a}, {b}, {a}, {a, b}, {} (pnat (4, 1), (2, 4), (3, 1), (4, 3), (1, 1))
ACCEPTED = [[4, 1, 1], [2, 1, 3], [1, 1, 1], [4, 1, 2], [1, 1, 1], [1, 1, 1]]
WRITES = [[0, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 0]]
CPU_STEPS = 3           # the interpreter is slow; the GPU runs all six
DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles decode_step (or the mixer step) anew: past the recompile limit (8 per code
    object, which earlier tests would use up) dynamo would silently run them eagerly."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def split_launches(tuned):
    """The split family (plan, coefficient kernel, write / no-write mains) from batch 1 on."""
    tuned({"split_min_batch": 1})


@pytest.fixture
def launches(request, tuned):
    """launch="split" (the plan and the split family at any batch) or "dynamic" (the fused launch at any
    batch, no plan), whatever the card's tuning table says."""
    tuned({"split_min_batch": 1 if request.param == "split" else 1 << 30})
    return request.param


def config(device):
    # the GPU's tensor-core tiles need P, N >= 16 (tiny has 8); the interpreter runs tiny in less time
    return TINY if device == "cpu" else SIZES["small"]


def model_and_cache(device, dtype=torch.float32, validate=True):
    model = TinyMamba2LM(config(device), seed=0, dtype=dtype, device=device, ssu="op", conv="triton", precision="exact",
                         validate=validate)
    cache = model.new_cache(5, T, window=W)
    slots = cache.allocate(3)
    gen = torch.Generator().manual_seed(1)
    for r in range(3):
        model.prefill(torch.randint(0, 256, (5 + r,), generator=gen), cache, int(slots[r]))
    rows = torch.tensor([int(slots[0]), cache.pad_slot_id, int(slots[2])], dtype=torch.int32, device=device)
    return model, cache, rows


def assert_same_bits(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}[{i}] differs from eager"


def run_steps(models, caches, rows, device, check_step):
    """Verify steps on each (model, cache) while the write mix changes (WRITES); commits run eagerly."""
    gen = torch.Generator().manual_seed(2)
    steps = CPU_STEPS if device == "cpu" else len(ACCEPTED)
    for acc, writes in zip(ACCEPTED[:steps], WRITES):
        tokens = torch.randint(0, 256, (3, T), generator=gen).to(device)
        assert caches[0].will_write(rows, T).tolist() == [bool(w) for w in writes], "test setup"
        check_step([m.step(tokens, c, rows) for m, c in zip(models, caches)])
        for c in caches:
            c.commit(rows, torch.tensor(acc, dtype=torch.int32, device=device), T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("launches", ["dynamic", "split"], indirect=True)
def test_compiled_model_step_equals_eager_bit_for_bit(launches, device):
    """aot_eager runs the ATen kernels eager runs: the whole LM step (plan, every layer's conv1d, SSM
    step, gated norm, logits) gives the same bits, and the caches hold the same bits after each step."""
    launch = launches
    eager, cache_e, rows = model_and_cache(device)
    compiled, cache_c, _ = model_and_cache(device)
    compiled.compile_step("aot_eager")

    def check(logits):
        assert_same_bits([logits[1]], [logits[0]], "logits")
        assert_same_bits(cache_c.tensors(), cache_e.tensors(), "cache tensor")
        if launch == "split":
            assert_same_bits(compiled._plan.tensors()[:4], eager._plan.tensors()[:4], "plan buffer")
        else:
            assert eager._plan is None and compiled._plan is None

    run_steps([eager, compiled], [cache_e, cache_c], rows, device, check)
    assert counters["stats"]["unique_graphs"] == 1          # compiled once, not run eagerly


@pytest.mark.interpreter
def test_one_graph_no_breaks_no_recompiles(split_launches):
    """torch._dynamo.explain: the decode step is one graph without breaks, and later steps (another
    write mix, another plan) reuse the first compile."""
    model, cache, rows = model_and_cache("cpu")
    plan = model._step_plan(cache, 3, T)
    tokens = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(3))
    explained = torch._dynamo.explain(model.decode_step)(tokens, cache, rows, plan)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    model.compile_step("aot_eager")
    model.step(tokens, cache, rows)
    cache.commit(rows, torch.tensor([4, 1, 4], dtype=torch.int32), T)
    with torch._dynamo.config.patch(error_on_recompile=True):
        model.step(tokens, cache, rows)


@pytest.mark.parametrize("device", DEVICES)
def test_inductor_mixer_step(device, split_launches):
    """inductor: the Mamba2 mixer step (plan, conv1d, SSM step, gate) compiled with fullgraph. Every
    tensor the specssm ops write (conv state, SSM state, rings, plan) is bit-identical to eager; the
    output after the gated RMSNorm equals to float rounding, since inductor fuses the norm's reduction
    and sums in another order than ATen (compiled alone, gated_rmsnorm differs the same way)."""
    model, cache_e, rows = model_and_cache(device)
    cache_c = model.new_cache(5, T, window=W)
    for a, b in zip(cache_c.tensors(), cache_e.tensors()):
        a.copy_(b)
    mixer = model.mixers[0]
    plans = [StepPlan(3, device) for _ in range(2)]
    for plan in plans:          # allocated before the trace, as TinyMamba2LM.step does
        plan.scratch(model.local_cfg.nheads, model.dtype)

    def mixer_step(h, cache, slots, plan):
        plan.build(cache.ssm.pnat, slots, cache.window, h.shape[1], cache.pad_slot_id)
        return mixer.step(h, cache, slots, functools.partial(model.ssu, plan=plan), model.conv)

    compiled = torch.compile(mixer_step, backend="inductor", fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(4)
    tol = 1e-6 if device == "cpu" else 1e-5
    for acc in ACCEPTED[:CPU_STEPS if device == "cpu" else None]:
        h = torch.randn(3, T, model.cfg.d_model, generator=gen).to(device)
        want = mixer_step(h, cache_e, rows, plans[0])
        got = compiled(h, cache_c, rows, plans[1])
        assert_same_bits(cache_c.tensors(), cache_e.tensors(), "cache tensor")
        assert_same_bits(plans[1].tensors()[:4], plans[0].tensors()[:4], "plan buffer")
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for c in (cache_e, cache_c):
            c.commit(rows, torch.tensor(acc, dtype=torch.int32, device=device), T)
    assert counters["stats"]["unique_graphs"] == 1


FORMS = {   # make_step arguments, and whether A, D, dt_bias and dt pass compact instead of tied
    "tied": (dict(), False),
    "compact": (dict(), True),
    "varlen": (dict(varlen_lens=[4, 2, 3]), True),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("form", list(FORMS))
def test_compiled_op_forms_and_checks(form, backend, device):
    """checkpointing_ssu alone under torch.compile(fullgraph) with tied stride-0 parameters, compact ones,
    or varlen rows: the same output bits (padding rows left NaN) and cache bits as eager. Then a bad
    pnat of a live slot: the compiled call raises the op's ValueError before anything is written."""
    kw, as_compact = FORMS[form]
    cache, ins = make_step(batch=3, T=4, pnat=[15, 0, 2], pad_rows=(1,), act=torch.float32, seed=6, **kw)
    caches = [to_device(cache, ins, device) for _ in range(2)]       # keeps A, D, dt_bias, dt tied
    ins = caches[0][1]
    if as_compact:
        ins = dict(ins, dt=ins["dt"][..., 0].contiguous(),
                   **{k: ins[k].reshape(ins[k].shape[0], -1)[:, 0].contiguous() for k in ("A", "D", "dt_bias")})
    else:
        assert ins["A"].stride() == (1, 0, 0) and ins["dt"].stride(-1) == 0
    pools = [c.op_kwargs(0) for c, _ in caches]
    outs = [ins["out"].clone(), ins["out"].clone()]

    def step(ins, pool, out):
        return checkpointing_ssu(**dict(ins, out=out), **pool, launch="dynamic", precision="exact")

    step(ins, pools[0], outs[0])
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    assert compiled(ins, pools[1], outs[1]) is outs[1]
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(outs[1].isnan(), outs[0].isnan()) and outs[0].isnan().any()       # padding rows
    assert torch.equal(torch.nan_to_num(outs[1]), torch.nan_to_num(outs[0]))
    assert_same_bits([v for v in pools[1].values() if isinstance(v, torch.Tensor)],
                     [v for v in pools[0].values() if isinstance(v, torch.Tensor)], "cache tensor")

    live = int(ins["state_batch_indices"][2])
    pools[1]["prev_num_accepted_tokens"][live] = 17
    before = [v.clone() for v in pools[1].values() if isinstance(v, torch.Tensor)] + [outs[1].clone()]
    with pytest.raises(ValueError, match=f"^prev_num_accepted_tokens: .* got 17 for slot {live}"):
        compiled(ins, pools[1], outs[1])
    after = [v for v in pools[1].values() if isinstance(v, torch.Tensor)] + [outs[1]]
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, before))


@pytest.mark.interpreter
def test_compiled_split_step_with_a_plan_without_scratch():
    """A plan whose scratch was not allocated before the trace: the compiled step allocates a temporary
    one per call (outside the plan: a trace must not create it) and still gives eager's bits."""
    cache, ins = make_step(batch=3, T=4, pnat=[15, 0, 2], pad_rows=(1,), act=torch.float32, seed=9)
    caches = [to_device(cache, ins, "cpu")[0] for _ in range(2)]
    outs = [ins["out"].clone(), ins["out"].clone()]
    plans = [StepPlan(3).build(c.pnat, ins["state_batch_indices"], c.W, 4) for c in caches]

    def step(ins, pool, out, plan):
        return checkpointing_ssu(**dict(ins, out=out), **pool, plan=plan, launch="split", precision="exact")

    step(ins, caches[0].op_kwargs(0), outs[0], plans[0])
    assert plans[0].allocated_scratch(4, torch.float32) is not None        # eager: at the first split step
    torch.compile(step, backend="aot_eager", fullgraph=True)(ins, caches[1].op_kwargs(0), outs[1], plans[1])
    assert plans[1].allocated_scratch(4, torch.float32) is None
    assert torch.equal(outs[1].nan_to_num(), outs[0].nan_to_num()) and torch.equal(outs[1].isnan(), outs[0].isnan())
    assert_same_bits(caches[1].tensors(), caches[0].tensors(), "cache tensor")


@pytest.mark.interpreter
def test_demo_compile(capsys):
    from specssm.model.demo import main
    assert main(["--size", "tiny", "--tokens", "6", "--batch", "2", "--compile", "aot_eager"]) == 0
    out = capsys.readouterr().out
    assert "decode step: torch.compile(aot_eager, fullgraph)" in out and "demo: OK" in out
    with pytest.raises(SystemExit):
        main(["--compile", "reduce-overhead"])            # CUDA graphs need --device cuda


# ---- GPU: CUDA graphs (mode="reduce-overhead") ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("launches", ["dynamic", "split"], indirect=True)
def test_gpu_reduce_overhead_across_steps(launches):
    """The decode step compiled with inductor and replayed from CUDA graphs (validate=False) while the
    write mix changes over six steps (warm-up, recording, four replays): the same bits as the same
    compile without graphs (same kernels, launched from a graph), eager's outputs to rounding
    (inductor's fused norms), graphs recorded and none skipped."""
    runs = [model_and_cache("cuda", validate=False) for _ in range(3)]
    rows = runs[0][2]
    runs[1][0].compile_step("inductor")
    runs[2][0].compile_step("inductor", mode="reduce-overhead")

    def check(logits):
        eager, plain, graphed = logits
        assert_same_bits([graphed], [plain], "logits")
        assert_same_bits(runs[2][1].tensors(), runs[1][1].tensors(), "cache tensor")
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)

    run_steps([r[0] for r in runs], [r[1] for r in runs], rows, "cuda", check)
    assert counters["inductor"]["cudagraph_skips"] == 0, "a CUDA graph was skipped"
    # a recorded graph counts its non-static inputs (tokens, slots): the graphed run did record
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] > 0
    assert counters["stats"]["unique_graphs"] == 2          # one per compile, none again across steps
    with pytest.raises(ValueError, match=r"^validate:"):
        model_and_cache("cuda", validate=True)[0].compile_step("inductor", mode="reduce-overhead")
