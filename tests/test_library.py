"""The custom ops of specssm/library.py: torch.library.opcheck of each (schema: what it writes is
declared; fake implementation; AOT dispatch), the public functions dispatch to them, and arguments
that do not fit a schema still get the error naming them. CPU (interpreter) and `-m gpu`."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import specssm.library  # noqa: F401  (registers the ops)
from specssm.cache import SSMCache, StepPlan
from specssm.cache.faults import new_record as new_fault_record
from specssm.conv import conv1d_update, new_conv_state
from specssm.ops import all_states_ssu, always_write_ssu, checkpointing_ssu
from specssm.reference import checkpointing_ssu_ref
from tests.helpers.compare import rel_rms
from tests.helpers.steps import make_step

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def compact(ins):
    """Step inputs with A, D, dt_bias as (H,) and dt as (.., H), contiguous: opcheck copies its inputs with
    clone(), which turns a tied stride-0 view into a full tensor the kernels reject (tied views are
    covered by the compile tests, tests/model/test_model_compile.py)."""
    out = dict(ins)
    for k in ("A", "D", "dt_bias"):
        v = ins[k]
        out[k] = v.reshape(v.shape[0], -1)[:, 0].contiguous()
    out["dt"] = ins["dt"][..., 0].contiguous()
    return out


def on(device, kw):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def step_args(strategy="checkpointing", **kw):
    cache, ins = make_step(batch=3, T=4, pad_rows=(1,), strategy=strategy, seed=11, **kw)
    args = dict(compact(ins), **cache.op_kwargs(0))
    if strategy == "always_write":
        args.pop("window")
    return cache, args


def plan_args(plan):
    return dict(plan_order=plan.order, plan_slots=plan.slots, plan_counts=plan.counts, plan_batch=plan.batch)


def case_split_int8_sr(device):
    """The split launches over a plan with its scratch, an int8 state with its scales, SR rounding."""
    cache, args = step_args(state_dtype=torch.int8, pnat=[15, 0, 2])
    args = on(device, args)
    plan = StepPlan(4, device).build(args["prev_num_accepted_tokens"], args["state_batch_indices"], cache.W, 4)
    coef, vec = plan.scratch(args["x"].shape[-2], args["x"].dtype)
    return dict(args, **plan_args(plan), plan_coef=coef, plan_vec=vec, launch="split", rounding="sr",
                rand_seed=cache.seeds.to(device), precision="exact")


def case_varlen(device):
    cache, args = step_args(varlen_lens=[4, 2, 3], use_z=False)
    return dict(on(device, args), launch="dynamic", precision="exact")


def case_plan_build(device, per_row, checked=False):
    pnat = torch.tensor([15, 2, 9, 0], dtype=torch.int32, device=device)
    sbi = torch.tensor([1, -1, 0, 2], dtype=torch.int32, device=device)
    plan = StepPlan(6, device)
    lens = torch.tensor([4, 4, 2, 1], dtype=torch.int32, device=device) if per_row else None
    # every argument given, the optional ones as None too: torch 2.11 drops trailing arguments equal to
    # their defaults and then misses a mutated one (an IndexError in its ADInplaceOrView kernel)
    ring = dict(ring_start=torch.tensor([0, 3, 21, 5], dtype=torch.int32, device=device), ring_len=22,
                max_pnat=16, faults=new_fault_record(device)) if checked else dict(
                ring_start=None, ring_len=0, max_pnat=0, faults=None)
    return dict(pnat=pnat, state_batch_indices=sbi, window=16, num_tokens=0 if per_row else 4,
                num_tokens_per_row=lens, pad_slot_id=-1, validate=True, write_flag=plan.write_flag,
                order=plan.order, slots=plan.slots, counts=plan.counts, **ring)


def case_commit(device, strategy):
    cache = SSMCache(1, 4, 2, 4, 4, 1, 4, 6, act_dtype=torch.float32, strategy=strategy, device=device)
    cache.pnat.copy_(torch.tensor([5, 0, 2, 1], dtype=torch.int32))
    ring = strategy != "all_states"
    return dict(slots=torch.tensor([2, -1, 0], dtype=torch.int32, device=device),
                accepted=torch.tensor([3, 1, 4], dtype=torch.int32, device=device), num_tokens=None,
                max_tokens=4, window=cache.W, ring_len=cache.L, num_slots=4, pad_slot_id=-1, validate=True,
                seeds=cache._seeds, ring_start=cache._ring_start if ring else None,
                pnat=cache._pnat if ring else None, state_index=None if ring else cache._state_index, faults=None)


def case_conv(device, bias):
    g = torch.Generator().manual_seed(3)
    state = new_conv_state(5, 24, 4, 4, torch.float32, device)
    state.copy_(torch.randn(state.shape, generator=g))
    xBC = torch.randn(3, 4, 24, generator=g).to(device)
    return dict(xBC=xBC, conv_state=state, conv_offset=torch.tensor([0, 2, 1, 4, 3], dtype=torch.int32, device=device),
                weight=torch.randn(24, 4, generator=g).to(device),
                bias=torch.randn(24, generator=g).to(device) if bias else None, activation="silu" if bias else None,
                state_batch_indices=torch.tensor([4, -1, 1], dtype=torch.int32, device=device), pad_slot_id=-1,
                out=torch.full_like(xBC, float("nan")), validate=True, pdl=False)


def case_bare(device):
    """No D, z, dt_bias, state_batch_indices (row b uses slot b): the schema's None defaults."""
    cache, args = step_args()
    args = dict(args, D=None, z=None, dt_bias=None, state_batch_indices=None)
    return dict(on(device, args), launch="split")


CASES = {
    "checkpointing dynamic": lambda d: ("checkpointing_ssu", dict(on(d, step_args()[1]), launch="dynamic")),
    "checkpointing bare split": lambda d: ("checkpointing_ssu", case_bare(d)),
    "checkpointing split int8 sr": lambda d: ("checkpointing_ssu", case_split_int8_sr(d)),
    "checkpointing varlen": lambda d: ("checkpointing_ssu", case_varlen(d)),
    "always_write": lambda d: ("always_write_ssu", on(d, step_args("always_write")[1])),
    "all_states": lambda d: ("all_states_ssu", on(d, step_args("all_states")[1])),
    "plan_build": lambda d: ("plan_build", case_plan_build(d, per_row=False)),
    "plan_build per row": lambda d: ("plan_build", case_plan_build(d, per_row=True)),
    "plan_build checked": lambda d: ("plan_build", case_plan_build(d, per_row=False, checked=True)),
    "commit ring": lambda d: ("cache_commit", case_commit(d, "checkpointing")),
    "commit all_states": lambda d: ("cache_commit", case_commit(d, "all_states")),
    "conv1d": lambda d: ("conv1d_update", case_conv(d, bias=True)),
    "conv1d no bias": lambda d: ("conv1d_update", case_conv(d, bias=False)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case, device):
    name, kwargs = CASES[case](device)
    op = getattr(torch.ops.specssm, name).default
    # the op writes what its schema declares and nothing else (test_schema), its fake runs without
    # kernels (test_faketensor), and AOTAutograd traces it with dynamic shapes (test_aot_dispatch_dynamic)
    torch.library.opcheck(op, (), kwargs)


@pytest.mark.parametrize("launch", ["dynamic", "split"])
def test_optional_arguments_left_out(launch):
    """D, z, dt_bias and state_batch_indices None, no softplus, through the op: the float64 reference's
    outputs and written state; the other states bit-identical."""
    cache, ins = make_step(batch=3, T=4, act=torch.float32, seed=8)
    cache.pnat[:3] = torch.tensor([15, 0, 2], dtype=torch.int32)        # row b on slot b: row 0 writes
    ins = dict(ins, D=None, z=None, dt_bias=None, state_batch_indices=None, dt_softplus=False,
               dt=ins["dt"][..., :1].abs().expand(ins["dt"].shape))
    ref_cache, ref_out = copy.deepcopy(cache), ins["out"].clone()
    checkpointing_ssu_ref(**dict(ins, out=ref_out), **ref_cache.op_kwargs(0))
    before = cache.layers[0].state.clone()
    checkpointing_ssu(**ins, **cache.op_kwargs(0), launch=launch, precision="exact")
    assert not ins["out"].isnan().any() and rel_rms(ins["out"], ref_out) <= 1e-5
    state, ref_state = cache.layers[0].state, ref_cache.layers[0].state
    assert rel_rms(state[0], ref_state[0]) <= 1e-5 and not torch.equal(state[0], before[0])     # row 0 writes
    assert torch.equal(state[1:], before[1:])


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_public_functions_dispatch_to_the_ops():
    """Each public entry point reaches its op through the dispatcher (what torch.compile traces), and
    returns what it returned before (`out`, the plan)."""
    log = OpLog()
    cache, ins = make_step(batch=3, T=4, pad_rows=(1,), seed=2)
    plan = StepPlan(3)
    with log:
        assert plan.build(cache.pnat, ins["state_batch_indices"], cache.W, 4) is plan
        assert checkpointing_ssu(**ins, **cache.op_kwargs(0), plan=plan, launch="split") is ins["out"]
        cache.commit(ins["state_batch_indices"], torch.tensor([1, 1, 4], dtype=torch.int32))
    aw_cache, aw = make_step(batch=2, T=2, strategy="always_write", seed=3)
    as_cache, as_ = make_step(batch=2, T=2, strategy="all_states", seed=4)
    conv = case_conv("cpu", bias=True)
    with log:
        assert always_write_ssu(**aw, **aw_cache.op_kwargs(0)) is aw["out"]
        assert all_states_ssu(**as_, **as_cache.op_kwargs(0)) is as_["out"]
        got = conv1d_update(conv["xBC"], conv["conv_state"], conv["conv_offset"], conv["weight"], conv["bias"],
                            state_batch_indices=conv["state_batch_indices"])
    assert got.shape == conv["xBC"].shape and not got[[0, 2]].isnan().any()
    ops = [n for n in log.names if n.startswith("specssm::")]
    assert ops == ["specssm::plan_build", "specssm::checkpointing_ssu", "specssm::cache_commit",
                   "specssm::always_write_ssu", "specssm::all_states_ssu", "specssm::conv1d_update"]


def test_arguments_outside_the_schema_get_the_named_error():
    """A list where a tensor goes, a float where an int goes: the implementation's checks answer (the
    dispatcher's own error would not name the argument), before anything is written."""
    cache, ins = make_step(batch=2, T=2, seed=5)
    state = cache.layers[0].state.clone()
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor, got list"):
        checkpointing_ssu(**dict(ins, x=[1.0]), **cache.op_kwargs(0))
    plan = StepPlan(2)
    with pytest.raises(ValueError, match=r"^num_tokens:"):
        plan.build(cache.pnat, ins["state_batch_indices"], cache.W, 4.0)
    with pytest.raises(TypeError, match=r"^x: expected dtype"):      # not an error from allocating scratch
        checkpointing_ssu(**dict(ins, x=ins["x"].int()), **cache.op_kwargs(0), plan=plan, launch="split")
    assert plan.allocated_scratch(4, torch.int32) is None
    with pytest.raises(TypeError, match=r"^slots:"):
        cache.commit([0, 1], torch.ones(2, dtype=torch.int32))
    conv = case_conv("cpu", bias=True)
    before = conv["conv_state"].clone()
    with pytest.raises(TypeError, match=r"^pad_slot_id:"):
        conv1d_update(conv["xBC"], conv["conv_state"], conv["conv_offset"], conv["weight"], pad_slot_id=-1.0)
    assert torch.equal(cache.layers[0].state, state) and torch.equal(conv["conv_state"], before)
    assert plan.batch == 0


def test_plan_tensors_are_checked_by_the_step_op():
    """A caller of the op may pass any tensors as the plan's: scratch of the wrong shape is refused
    (the kernels index it up to the plan's rows) before anything is written."""
    cache, args = step_args()
    plan = StepPlan(3).build(args["prev_num_accepted_tokens"], args["state_batch_indices"], cache.W, 4)
    coef, vec = plan.scratch(args["x"].shape[-2], args["x"].dtype)
    out = args["out"].clone()
    with pytest.raises(ValueError, match=r"^plan_coef:"):
        torch.ops.specssm.checkpointing_ssu(**args, **plan_args(plan), plan_coef=coef[:2], plan_vec=vec[:2],
                                            launch="split")
    with pytest.raises(ValueError, match=r"^plan_batch:"):
        torch.ops.specssm.checkpointing_ssu(**args, **dict(plan_args(plan), plan_batch=4), launch="split")
    assert torch.equal(args["out"].isnan(), out.isnan())
