"""The runner's cache/input wiring, driven on a CPU with the float64 references standing in for the
Triton ops (no graphs, no timing): every keyword the runner passes must be one the op signature has."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specssm import reference
from specssm.bench import cli, mix, strategies
from specssm.bench.cases import Case, Shape, Variant
from specssm.bench.runner import Env, Skip, slot_set_count
from specssm.cache import StepPlan

TINY = Shape("tiny", 2, 4, 8, 1)
OP_ONLY = ("plan", "launch", "precision", "validate", "pdl")


def fake_bench(argv=(), conv_update=None, peer_entry=None, peer_error=None):
    opts = cli.resolve(cli.build_parser().parse_args(["--max-sets", "3", *argv]))
    return SimpleNamespace(opts=opts, hist=dict(mix.DEFAULT_ACCEPTANCE), device=torch.device("cpu"),
                           l2_bytes=4096, conv_update=conv_update, peer_entry=peer_entry, peer_error=peer_error)


def standin(ref, calls):
    """The reference with the op-only keywords checked and dropped."""
    def op(*args, **kw):
        calls.append({k: kw.get(k) for k in OP_ONLY})
        for k in OP_ONLY:
            kw.pop(k, None)
        return ref(*args, **kw)
    return op


def test_the_strategy_table_matches_the_caches_and_the_ops():
    """Every strategy the harness times is one SSMCache keeps, with its op in specssm.ops; a peer's
    caches are those of a strategy with plans (its work items come from our plans)."""
    from specssm import ops
    from specssm.cache.cache import STRATEGIES as CACHE_STRATEGIES
    assert strategies.NAMES == CACHE_STRATEGIES
    for st in strategies.STRATEGIES.values():
        assert callable(getattr(ops, st.op)), st.op
        assert st.ring or not (st.window or st.plan), st.name       # a window and plans need the rings
    assert strategies.STRATEGIES[strategies.PEER_CACHES].plan
    with pytest.raises(ValueError, match=r"^strategy: expected one of"):
        strategies.get("sometimes")


@pytest.fixture
def fake_ops(monkeypatch):
    from specssm import ops
    calls = []
    monkeypatch.setattr(ops, "checkpointing_ssu", standin(reference.checkpointing_ssu_ref, calls), raising=False)
    monkeypatch.setattr(ops, "always_write_ssu", standin(reference.always_write_ssu_ref, calls), raising=False)
    monkeypatch.setattr(ops, "all_states_ssu", standin(reference.all_states_ssu_ref, calls), raising=False)
    return calls


@pytest.mark.parametrize("strategy,dtype,scenario,rounding", [
    ("checkpointing", "fp32", "mixed", "rn"), ("checkpointing", "bf16", "all_write", "rn"),
    ("checkpointing", "int8", "all_no_write", "rn"), ("checkpointing", "fp8", "mixed", "rn"),
    ("checkpointing", "bf16", "mixed", "sr"),
    ("always_write", "fp16", "any", "rn"), ("all_states", "bf16", "any", "rn")])
def test_env_drives_the_reference(fake_ops, strategy, dtype, scenario, rounding):
    bench = fake_bench()
    case = Case(TINY, Variant(strategy, "split", "replay"), dtype, rounding, scenario, batch=2, T=2, W=4)
    env = Env(bench, case)
    assert env.sets_n == 3 and len(env.slot_sets) == 3
    all_slots = torch.cat(env.slot_sets).sort().values
    assert torch.equal(all_slots, torch.arange(6, dtype=torch.int32))      # disjoint sets cover the slots
    env.set_scenario(scenario)
    step = env.step_fn(case)
    env.out.fill_(float("nan"))
    for i in range(env.sets_n):
        step(i, i == 0)
    assert torch.isfinite(env.out.float()).all()
    assert len(fake_ops) == 3 and fake_ops[0]["validate"] is True and fake_ops[1]["validate"] is False
    if strategy != "checkpointing":
        assert fake_ops[0]["plan"] is None and fake_ops[0]["launch"] is None
        assert all(b.writes == 2 for b in env.bytes)
        return
    assert fake_ops[0]["launch"] == "split" and fake_ops[0]["precision"] == "fast"
    plan = fake_ops[0]["plan"]
    assert isinstance(plan, StepPlan)
    pnat = env.cache.pnat[env.slot_sets[0].long()]
    assert plan.write_flag[:2].tolist() == (pnat + 2 > 4).int().tolist()
    wf = np.mean([b.writes / b.rows for b in env.bytes])
    if scenario == "all_write":
        assert wf == 1.0
    if scenario == "all_no_write":
        assert wf == 0.0


def test_plan_fn_rebuilds_the_same_plan(fake_ops):
    bench = fake_bench()
    case = Case(TINY, Variant("checkpointing"), "fp32", "rn", "mixed", batch=2, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    before = [(p.write_flag.clone(), p.order.clone(), p.counts.clone()) for p in env.plans]
    fn = env.plan_fn()
    for i in range(env.sets_n):
        fn(i)
    for p, (w, o, c) in zip(env.plans, before):
        assert torch.equal(p.write_flag, w) and torch.equal(p.order, o) and torch.equal(p.counts, c)


def test_missing_op_and_rejected_dtype_are_skips(monkeypatch):
    from specssm import ops
    monkeypatch.delattr(ops, "checkpointing_ssu", raising=False)
    bench = fake_bench()
    case = Case(TINY, Variant("checkpointing"), "fp32", "rn", "mixed", batch=1, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    with pytest.raises(Skip, match="checkpointing_ssu does not exist"):
        env.step_fn(case)
    with pytest.raises(Skip, match="float states only"):
        Env(bench, Case(TINY, Variant("all_states"), "int8", "rn", "any", batch=1, T=2, W=4))


@pytest.mark.interpreter
def test_conv_wiring(fake_ops):
    from specssm.conv import conv1d_update
    bench = fake_bench(conv_update=conv1d_update)
    case = Case(TINY, Variant("checkpointing"), "fp32", "rn", "mixed", batch=2, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    env.conv["out"].fill_(float("nan"))
    env.conv_fn()(1)
    assert torch.isfinite(env.conv["out"].float()).all()


@pytest.mark.parametrize("strategy", ["checkpointing", "always_write", "all_states"])
def test_pdl_goes_to_the_checkpointing_op_only(fake_ops, strategy):
    from specssm.bench.runner import GpuBench
    bench = fake_bench(["--pdl"])
    case = Case(TINY, Variant(strategy), "fp32", "rn", "mixed" if strategy == "checkpointing" else "any",
                batch=2, T=2, W=4)
    pdl = GpuBench.uses_pdl(bench, case)
    assert pdl == (strategy == "checkpointing")
    assert not GpuBench.uses_pdl(fake_bench(), case)
    env = Env(bench, case)
    env.set_scenario(case.scenario)
    env.step_fn(case, pdl)(0, False)
    env.step_fn(case)(0, False)
    assert [c["pdl"] for c in fake_ops] == [True if pdl else None, None]


@pytest.mark.interpreter
def test_conv_with_pdl_gives_the_same_outputs(fake_ops):
    from specssm.conv import conv1d_update
    bench = fake_bench(["--pdl"], conv_update=conv1d_update)
    case = Case(TINY, Variant("checkpointing"), "fp32", "rn", "mixed", batch=2, T=2, W=4)
    env = Env(bench, case)
    state0 = env.conv["conv_state"].clone()
    results = []
    for pdl in (False, True):
        env.conv["conv_state"].copy_(state0)
        env.conv_fn(pdl)(1)
        results.append((env.conv["out"].clone(), env.conv["conv_state"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_sweep_override_holds_during_its_op_call_only(monkeypatch):
    """--sweep: the variant's tuning override is merged on the configs (tuning.overridden) around each call of the op
    (inside a CUDA-graph capture that is when the launch config is chosen), and gone after it."""
    from specssm import ops
    from specssm.step import tuning
    seen = []

    def op(**kw):
        seen.append(tuning.active_override())
    monkeypatch.setattr(ops, "checkpointing_ssu", op)
    over = '{"coef": {"HB": 4}}'
    bench = fake_bench()
    for config in (over, ""):
        case = Case(TINY, Variant("checkpointing", "split", "rectangle", config), "fp32", "rn", "mixed", 2, 2, 4)
        env = Env(bench, case)
        env.set_scenario("mixed")
        env.step_fn(case)(0, False)
        assert tuning.active_override() == {}
    assert seen == [{"coef": {"HB": 4}}, {}]


def test_slot_set_count():
    MiB = 2**20
    # 512 KiB touched per step, L2 50 MiB, 4x: 400 sets
    assert slot_set_count(512 * 1024, MiB, 50 * MiB, 4.0, 4096, 1e12) == 400
    assert slot_set_count(512 * 1024, MiB, 50 * MiB, 4.0, 100, 1e12) == 100          # capped
    assert slot_set_count(10**12, MiB, 50 * MiB, 4.0, 4096, 1e12) == 2                # at least 2
    assert slot_set_count(512 * 1024, MiB, 50 * MiB, 4.0, 4096, 10 * MiB) == 10       # memory bound
    with pytest.raises(Skip, match="GiB"):
        slot_set_count(512 * 1024, 2 * MiB, 50 * MiB, 4.0, 4096, MiB)


@pytest.mark.interpreter
@pytest.mark.parametrize("strategy,launch,dtype", [("checkpointing", "split", "bf16"),
                                                   ("checkpointing", "dynamic", "fp32"),
                                                   ("always_write", "auto", "fp16"), ("all_states", "auto", "fp32")])
def test_env_drives_the_triton_ops(strategy, launch, dtype):
    """The real ops (interpreted) accept what the runner passes; rejected cases become skips."""
    pytest.importorskip("specssm.step")
    bench = fake_bench()
    case = Case(TINY, Variant(strategy, launch, "rectangle"), dtype, "rn",
                "mixed" if strategy == "checkpointing" else "any", batch=2, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario(case.scenario)
    env.out.fill_(float("nan"))
    step = env.checked_step_fn(case)
    step(1, False)
    assert torch.isfinite(env.out.float()).all()


@pytest.mark.interpreter
def test_op_rejection_is_a_skip():
    pytest.importorskip("specssm.step")
    bench = fake_bench()
    case = Case(TINY, Variant("checkpointing", "no-such-launch", "rectangle"), "fp32", "rn", "mixed", 2, 2, 4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    with pytest.raises(Skip, match="checkpointing_ssu rejected it: launch"):
        env.checked_step_fn(case)


# ---- the peer (--peer trtllm=PATH) on our checkpointing Env, with a stand-in for its entry ----------------
def standin_peer(calls, fail=None):
    """Checks what the peers README and the peer's docstring ask of its arguments, records the call."""
    def replay_selective_state_update(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens,
                                      x, dt, A, B, C, out, *, n_writes, replay_work_items, D=None, z=None,
                                      dt_bias=None, dt_softplus=False, state_batch_indices=None, rand_seed=None,
                                      philox_rounds=10, state_scales=None):
        if fail:
            raise fail
        S, H, P, N = state.shape
        batch, T, G = x.shape[0], x.shape[1], B.shape[2]
        L = x_cache.shape[2]
        assert x_cache.shape == (S, H, L, P) and B_cache.shape == (S, G, L, N) and dt_cache.shape == (S, H, L)
        assert dt_cache.dtype == torch.float32 and L - T >= T
        assert ring_start.shape == prev_num_accepted_tokens.shape == (S,)
        assert ring_start.dtype == prev_num_accepted_tokens.dtype == torch.int32
        assert A.stride(-1) == A.stride(-2) == 0 and dt.stride(-1) == 0 and dt_bias.stride(-1) == 0   # tied
        assert dt_softplus is True and out.shape == x.shape == (batch, T, H, P)
        assert n_writes.shape == (1,) and n_writes.dtype == torch.int32
        assert replay_work_items.shape == (batch, 4) and replay_work_items.dtype == torch.int32
        assert replay_work_items.is_contiguous()
        if state.dtype in (torch.int8, torch.float8_e4m3fn):
            assert state_scales.shape == (S, H, P) and state_scales.dtype == torch.float32
        if rand_seed is not None:
            assert rand_seed.shape == (S,) and rand_seed.dtype == torch.int64
        calls.append({"state": state, "state_scales": state_scales, "rand_seed": rand_seed,
                      "philox_rounds": philox_rounds, "sbi": state_batch_indices, "n_writes": n_writes.tolist(),
                      "items": replay_work_items.tolist()})
        out.fill_(0.5)
    return replay_selective_state_update


def expected_work_items(env, i):
    """Hand-built from pnat: write rows (pnat + T > W) first, then the others, each in row order."""
    slots = env.slot_sets[i].tolist()
    pnat = [int(env.cache.pnat[s]) for s in slots]
    write = [p + env.T > env.W for p in pnat]
    order = [r for r in range(len(slots)) if write[r]] + [r for r in range(len(slots)) if not write[r]]
    return [sum(write)], [[r, slots[r], pnat[r], 0] for r in order]


@pytest.mark.parametrize("dtype,rounding", [("int8", "sr"), ("fp32", "rn"), ("bf16", "rn")])
def test_peer_runs_on_the_checkpointing_env(dtype, rounding):
    calls = []
    bench = fake_bench(peer_entry=standin_peer(calls))
    case = Case(TINY, Variant("trtllm"), dtype, rounding, "mixed", batch=3, T=2, W=4)
    env = Env(bench, case)
    assert env.strategy == "checkpointing" and env.cache.strategy == "checkpointing" and env.W == 4
    env.set_scenario("mixed")
    assert len(env.plans) == 3
    env.out.fill_(float("nan"))
    step = env.checked_step_fn(case)          # one validated call on slot set 0
    for i in range(env.sets_n):
        step(i, False)
    assert torch.equal(env.out.float(), torch.full_like(env.out.float(), 0.5))
    layer = env.cache.layers[0]
    for i, call in enumerate(calls[1:]):
        assert call["state"] is layer.state and call["sbi"] is env.slot_sets[i]
        assert (call["n_writes"], call["items"]) == expected_work_items(env, i)
        assert call["philox_rounds"] == 10
        assert (call["rand_seed"] is env.cache.seeds) == (rounding == "sr")
        assert (call["rand_seed"] is None) == (rounding == "rn")
        assert call["state_scales"] is layer.state_scale and (layer.state_scale is None) == (dtype != "int8")
    assert env.peer_work_items() is env.peer_work_items()        # built once per scenario
    env.set_scenario("all_write")
    assert [n for n, _ in env.peer_work_items()] == [torch.tensor([3], dtype=torch.int32)] * 3


def test_peer_as_shipped_gets_no_tuning_keywords():
    seen = []
    bench = fake_bench(peer_entry=lambda *a, **kw: seen.append(set(kw)))
    case = Case(TINY, Variant("trtllm"), "int8", "sr", "mixed", batch=2, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    env.step_fn(case)(0, False)
    assert seen == [{"state", "x_cache", "B_cache", "dt_cache", "ring_start", "prev_num_accepted_tokens", "x", "dt",
                     "A", "B", "C", "out", "D", "z", "dt_bias", "dt_softplus", "philox_rounds", "state_scales",
                     "rand_seed", "state_batch_indices", "n_writes", "replay_work_items"}]


def test_what_the_peer_cannot_run_is_a_skip():
    from specssm.bench.runner import GpuBench
    msg = "fp16 stochastic rounding (PTX cvt.rs.f16x2.f32) requires sm_100a (Blackwell B200+); current SM is 90."
    bench = fake_bench(peer_entry=standin_peer([], fail=AssertionError(msg)))
    case = Case(TINY, Variant("trtllm"), "fp16", "sr", "mixed", batch=2, T=2, W=4)
    env = Env(bench, case)
    env.set_scenario("mixed")
    with pytest.raises(Skip, match=r"^trtllm rejected it: AssertionError: fp16 stochastic rounding \(PTX"):
        env.checked_step_fn(case)
    # its window is L - T = max(W, T): ours only when W >= T
    short = Case(TINY, Variant("trtllm"), "fp32", "rn", "mixed", batch=2, T=3, W=2)
    env = Env(bench, short)
    env.set_scenario("mixed")
    with pytest.raises(Skip, match="needs W >= T"):
        env.step_fn(short)
    # a peer that failed to import skips its cases with the import error
    failed = fake_bench(peer_error="importing trtllm=/x failed: ImportError: no triton")
    env = Env(failed, case)
    env.set_scenario("mixed")
    with pytest.raises(Skip, match=r"^importing trtllm=/x failed"):
        env.step_fn(case)
    # never a conv figure for a peer (its span is its own kernels), not even with --conv-all
    assert not GpuBench.wants_conv(fake_bench(["--conv-all"]), case)
    assert GpuBench.wants_conv(fake_bench(), Case(TINY, Variant("checkpointing"), "fp32", "rn", "mixed", 2, 2, 4))
