"""specssm's entry points as PyTorch custom ops (torch.library) in the `specssm` namespace.

torch.compile cannot trace a Triton launcher (it stops at "Attempted to call function marked as
skipped"), and a compiled graph, CUDA-graphed or not, must know which tensors each kernel writes. So
every public entry point marshals its arguments and calls one op registered here:

    public function                  op                           writes (mutates_args)
    checkpointing_ssu                specssm::checkpointing_ssu   state, state_scale, x/B/dt rings, out,
                                                                  the plan's scratch (plan_coef, plan_vec)
    always_write_ssu                 specssm::always_write_ssu    state, state_scale, x/B/dt rings, out
    all_states_ssu                   specssm::all_states_ssu      states, out
    StepPlan.build                   specssm::plan_build          write_flag, order, slots, counts
    SSMCache.commit                  specssm::cache_commit        seeds, ring_start, pnat, state_index
    conv1d_update                    specssm::conv1d_update       conv_state, out

An op's implementation is the launcher that ran before (it checks every argument before anything is
written, then launches), so the checks run on every call, eager or compiled: a compiled graph calls
the implementation like any other kernel. Choices that keep the schema honest:

* Ops return nothing: a custom op may not return one of its inputs, and every output here is a
  tensor the caller passes (`out`) or owns (the caches). The public functions return `out` as before.
  The fake implementations therefore have no shape to compute: on FakeTensors they do nothing (the
  checks run when the compiled graph calls the real implementation, with the exact exception type).
* Per-head parameters (A, D, dt_bias) pass as given, compact `(H,)` or tied stride-0 views, and dt
  tied over head_dim: the ops carry the `needs_exact_strides` tag, so inductor hands the kernels the
  strides eager has instead of materializing the views.
* A `StepPlan` is not a tensor: the step op takes its tensors (order, slots, counts), its batch (an
  int) and its split-step scratch (plan_coef, plan_vec, which the step writes), and rebuilds a plan
  around them (`StepPlan.over`). Passing the tensors, not a handle into a registry, lets the compiler
  see that the step reads what `plan_build` wrote earlier in the same graph.
* `num_tokens` of a plan build is an int or a per-row tensor: two arguments (`num_tokens`,
  `num_tokens_per_row`).

`call(name, **kwargs)` is how the public functions reach an op. When an argument does not fit the
schema (a list where a tensor goes, a float pad id), it calls the implementation directly instead of
the dispatcher, so the caller gets the implementation's ValueError/TypeError naming the argument,
not the dispatcher's generic one.
"""
import inspect
import typing
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

NAMESPACE = "specssm"
# inductor keeps the eager strides of every tensor argument: the kernels read tied (stride-0) views
# and rely on B and C sharing strides. (A torch without the tag applies its default for custom ops.)
_TAGS = tuple(t for t in (getattr(torch.Tag, "needs_exact_strides", None),) if t is not None)

_IMPLS: dict = {}        # op name -> the Python implementation (what `call` falls back to)
_ARG_TYPES: dict = {}    # op name -> ((argument, accepted Python types, optional), ...)
_PY_TYPES = {Tensor: (torch.Tensor,), int: (int, torch.SymInt), bool: (bool,), str: (str,)}


def _fake(impl):
    """The fake implementation of an op: the ops write their inputs and return nothing, so a trace
    (FakeTensor arguments) has nothing to compute. Without FakeTensors the call came through the Meta
    dispatch key (some argument on the meta device): run the implementation, whose checks reject the
    device as they did before the ops were registered."""
    def fake(*args, **kwargs):
        if any(isinstance(a, FakeTensor) for a in (*args, *kwargs.values())):
            return None
        return impl(*args, **kwargs)
    return fake


def _register(name: str, mutates: tuple, impl):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=mutates, tags=_TAGS)
    op.register_fake(_fake(impl))
    hints = typing.get_type_hints(impl)
    kinds = []
    for arg in inspect.signature(impl).parameters:
        hint = hints[arg]
        optional = typing.get_origin(hint) is typing.Union
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        kinds.append((arg, _PY_TYPES[base], optional))
    _IMPLS[name], _ARG_TYPES[name] = impl, tuple(kinds)
    return op


def _fits(value, types, optional) -> bool:
    if value is None:
        return optional
    if isinstance(value, bool) and bool not in types:       # an int argument given a bool
        return False
    return isinstance(value, types)


def call(name: str, **kwargs):
    """Run op `name` with keyword arguments (all of them); see the module docstring."""
    for arg, types, optional in _ARG_TYPES[name]:
        if not _fits(kwargs[arg], types, optional):
            return _IMPLS[name](**kwargs)
    op = getattr(getattr(torch.ops, NAMESPACE), name)
    if torch.compiler.is_compiling():
        return op(**kwargs)
    # Eager: dispatch below the autograd and ADInplaceOrView layers. No op here has a gradient, and the
    # ADInplaceOrView kernel of a custom op rebuilds the argument list from the schema on every call
    # (quadratic in the arguments: ~0.3 ms of host time for the step's 36) only to bump version
    # counters. Dispatch modes and tensor subclasses (FakeTensor, FunctionalTensor) still see the op.
    with torch._C._AutoDispatchBelowADInplaceOrView():
        return op(**kwargs)


# ---- the SSM steps ----------------------------------------------------------------------------------
_STEP_WRITES = ("state", "x_cache", "B_cache", "dt_cache", "out", "state_scale", "faults")


def _checkpointing_ssu(
        state: Tensor, x_cache: Tensor, B_cache: Tensor, dt_cache: Tensor, ring_start: Tensor,
        prev_num_accepted_tokens: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, out: Tensor,
        D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
        dt_softplus: bool = False, state_batch_indices: Optional[Tensor] = None, pad_slot_id: int = -1,
        state_scale: Optional[Tensor] = None, rand_seed: Optional[Tensor] = None, philox_rounds: int = 10,
        cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, window: Optional[int] = None,
        rounding: str = "rn", no_write_form: str = "rectangle", plan_order: Optional[Tensor] = None,
        plan_slots: Optional[Tensor] = None, plan_counts: Optional[Tensor] = None, plan_batch: int = 0,
        plan_coef: Optional[Tensor] = None, plan_vec: Optional[Tensor] = None, launch: str = "auto",
        precision: str = "fast", validate: bool = True, pdl: bool = False, faults: Optional[Tensor] = None) -> None:
    """`specssm.checkpointing_ssu` with the plan as its tensors (plan_order None: no plan)."""
    from specssm.cache.plan import StepPlan
    from specssm.step.launch import _ssu
    plan = None
    if plan_order is not None:
        plan = StepPlan.over(plan_order, plan_slots, plan_counts, plan_batch, plan_coef, plan_vec)
    _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out, D, z,
         dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed, philox_rounds,
         cu_seqlens, max_seqlen, window, rounding, no_write_form, plan, launch, precision, validate, pdl, faults)


checkpointing_ssu = _register("checkpointing_ssu", _STEP_WRITES + ("plan_coef", "plan_vec"), _checkpointing_ssu)


def _always_write_ssu(
        state: Tensor, x_cache: Tensor, B_cache: Tensor, dt_cache: Tensor, ring_start: Tensor,
        prev_num_accepted_tokens: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, out: Tensor,
        D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
        dt_softplus: bool = False, state_batch_indices: Optional[Tensor] = None, pad_slot_id: int = -1,
        state_scale: Optional[Tensor] = None, rand_seed: Optional[Tensor] = None, philox_rounds: int = 10,
        cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None, rounding: str = "rn",
        no_write_form: str = "rectangle", precision: str = "fast", validate: bool = True,
        faults: Optional[Tensor] = None) -> None:
    """`specssm.always_write_ssu`: the checkpointing launcher with window 0, every row writes."""
    from specssm.step.launch import _ssu
    _ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A, B, C, out, D, z,
         dt_bias, dt_softplus, state_batch_indices, pad_slot_id, state_scale, rand_seed, philox_rounds,
         cu_seqlens, max_seqlen, 0, rounding, no_write_form, None, "always_write", precision, validate,
         faults=faults)


always_write_ssu = _register("always_write_ssu", _STEP_WRITES, _always_write_ssu)


def _all_states_ssu(
        states: Tensor, state_index: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, out: Tensor,
        D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
        dt_softplus: bool = False, state_batch_indices: Optional[Tensor] = None, pad_slot_id: int = -1,
        validate: bool = True) -> None:
    """`specssm.all_states_ssu`: reads states[s, state_index[s]], writes all T states of the slot."""
    from specssm.step.baselines import _all_states
    _all_states(states, state_index, x, dt, A, B, C, out, D, z, dt_bias, dt_softplus, state_batch_indices,
                pad_slot_id, validate)


all_states_ssu = _register("all_states_ssu", ("states", "out"), _all_states_ssu)


# ---- the plan and the commit ------------------------------------------------------------------------
def _plan_build(
        pnat: Tensor, state_batch_indices: Tensor, window: int, num_tokens: int,
        num_tokens_per_row: Optional[Tensor], pad_slot_id: int, validate: Optional[bool],
        write_flag: Tensor, order: Tensor, slots: Tensor, counts: Tensor, ring_start: Optional[Tensor],
        ring_len: int, max_pnat: int, faults: Optional[Tensor]) -> None:
    """`StepPlan.build` into the plan's buffers; `num_tokens_per_row` (varlen) overrides `num_tokens`;
    with ring_start and the fault record, bad rows are set aside and recorded."""
    from specssm.cache.plan import fill_plan
    fill_plan(pnat, state_batch_indices, window, num_tokens if num_tokens_per_row is None else num_tokens_per_row,
              pad_slot_id, validate, write_flag, order, slots, counts, ring_start=ring_start, ring_len=ring_len,
              max_pnat=max_pnat, faults=faults)


plan_build = _register("plan_build", ("write_flag", "order", "slots", "counts", "faults"), _plan_build)


def _cache_commit(
        slots: Tensor, accepted: Tensor, num_tokens: Optional[Tensor], max_tokens: int, window: int,
        ring_len: int, num_slots: int, pad_slot_id: int, validate: bool, seeds: Tensor,
        ring_start: Optional[Tensor], pnat: Optional[Tensor], state_index: Optional[Tensor],
        faults: Optional[Tensor]) -> None:
    """`SSMCache.commit` on the per-slot arrays (num_slots + 1 entries: the last one takes padding rows);
    ring strategies pass ring_start and pnat, all-states passes state_index; bad rows are recorded in
    `faults` (validate=False)."""
    from specssm.cache.cache import commit_slots
    commit_slots(slots, accepted, num_tokens, max_tokens, window, ring_len, num_slots, pad_slot_id, validate,
                 seeds, ring_start, pnat, state_index, faults)


cache_commit = _register("cache_commit", ("seeds", "ring_start", "pnat", "state_index", "faults"), _cache_commit)


# ---- conv1d -----------------------------------------------------------------------------------------
def _conv1d_update(
        xBC: Tensor, conv_state: Tensor, conv_offset: Tensor, weight: Tensor, bias: Optional[Tensor],
        activation: Optional[str], state_batch_indices: Optional[Tensor], pad_slot_id: int, out: Tensor,
        validate: bool = False, pdl: bool = False) -> None:
    """`specssm.conv.conv1d_update` into `out` (which may be xBC itself)."""
    from specssm.conv.conv1d import _conv1d_update
    _conv1d_update(xBC, conv_state, conv_offset, weight, bias, activation, state_batch_indices, pad_slot_id, out,
                   validate, pdl)


conv1d_update = _register("conv1d_update", ("conv_state", "out"), _conv1d_update)
