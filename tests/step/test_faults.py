"""The no-sync path (validate=False) with values outside the contract: a live row with a bad slot id,
pnat or ring_start (step) or accepted (commit) does no work, touches nothing outside its slot, leaves
every other row's results as they would be without it, and is recorded: SSMCache.raise_if_faulted()
names the first faulted row, the field and the value, and clears the record."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from specssm.cache import StepPlan
from specssm.cache import faults as flt
from specssm.ops import checkpointing_ssu
from tests.helpers.compare import state_bits
from tests.helpers.steps import make_step

PNAT = [14, 3, 9, 12]          # row 0 writes, the others do not (T = 4, W = 16)
BAD_ROW = 1
FIELDS = ("state", "state_scale", "x_cache", "B_cache", "dt_cache")


def _case(state_dtype):
    cache, ins = make_step(batch=4, slots=7, H=2, P=16, N=16, G=1, T=4, pnat=PNAT, act=torch.float32,
                           state_dtype=state_dtype, seed=71)
    return cache, ins


def _corrupt(cache, ins, field, value):
    ins = dict(ins, state_batch_indices=ins["state_batch_indices"].clone(), out=ins["out"].clone())
    slot = int(ins["state_batch_indices"][BAD_ROW])
    if field == "slot":
        ins["state_batch_indices"][BAD_ROW] = value
    elif field == "pnat":
        cache.pnat[slot] = value
    else:
        cache.ring_start[slot] = value
    return ins


def _caches_equal(a, b):
    for f in FIELDS:
        ta, tb = getattr(a.layers[0], f), getattr(b.layers[0], f)
        if ta is not None:
            assert torch.equal(state_bits(ta), state_bits(tb)), f"{f} differs from the run without the row"
    for f in ("ring_start", "pnat", "seeds"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


SBI, PN, RS = "state_batch_indices", "prev_num_accepted_tokens", "ring_start"
BAD = [("slot", 7, SBI), ("slot", 8, SBI), ("slot", 100000, SBI), ("slot", -5, SBI), ("slot", -2, SBI),
       ("pnat", 17, PN), ("pnat", -3, PN), ("pnat", 10 ** 6, PN),
       ("ring_start", 20, RS), ("ring_start", -1, RS), ("ring_start", 10 ** 6, RS)]


@pytest.mark.parametrize("launch,state_dtype", [("dynamic", torch.float32), ("split", torch.float32),
                                                ("split", torch.int8)])
@pytest.mark.parametrize("field,value,name", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_a_bad_row_does_nothing_and_is_recorded(field, value, name, state_dtype, launch):
    cache, ins = _case(state_dtype)
    assert cache.L == 20 and max(cache.W, cache.T) == 16
    dirty = copy.deepcopy(cache)
    d_ins = _corrupt(dirty, ins, field, value)
    # the expected result: the same step with the row as padding (and the same corrupt cache values)
    clean = copy.deepcopy(dirty)
    c_ins = dict(d_ins, state_batch_indices=d_ins["state_batch_indices"].clone(), out=ins["out"].clone())
    c_ins["state_batch_indices"][BAD_ROW] = clean.pad_slot_id
    checkpointing_ssu(**c_ins, **clean.op_kwargs(0), launch=launch, validate=False)
    checkpointing_ssu(**d_ins, **dirty.op_kwargs(0), launch=launch, validate=False)
    assert torch.equal(d_ins["out"].isnan(), c_ins["out"].isnan()) and bool(d_ins["out"][BAD_ROW].isnan().all())
    assert torch.equal(torch.nan_to_num(d_ins["out"]), torch.nan_to_num(c_ins["out"]))
    _caches_equal(dirty, clean)
    assert int(clean.faults) == flt.NO_FAULT
    with pytest.raises(ValueError, match=rf"^{name}: row {BAD_ROW} .* had {re.escape(str(value))}\b"):
        dirty.raise_if_faulted()
    dirty.raise_if_faulted()                    # the record was cleared


def test_the_first_faulted_row_is_named():
    cache, ins = _case(torch.float32)
    ins = dict(ins, state_batch_indices=ins["state_batch_indices"].clone())
    ins["state_batch_indices"][3] = 50
    cache.pnat[int(ins["state_batch_indices"][2])] = 99
    checkpointing_ssu(**ins, **cache.op_kwargs(0), launch="split", validate=False)
    with pytest.raises(ValueError, match=r"^prev_num_accepted_tokens: row 2 .* had 99"):
        cache.raise_if_faulted()


@pytest.mark.parametrize("accepted", [0, 5, -1])
def test_commit_skips_and_records_a_bad_accepted(accepted):
    cache, ins = _case(torch.float32)
    sbi = ins["state_batch_indices"]
    acc = torch.tensor([2, accepted, 4, 1], dtype=torch.int32)
    clean = copy.deepcopy(cache)
    c_sbi = sbi.clone()
    c_sbi[BAD_ROW] = clean.pad_slot_id
    clean.commit(c_sbi, acc, validate=False)
    cache.commit(sbi, acc, validate=False)
    _caches_equal(cache, clean)
    with pytest.raises(ValueError, match=rf"^accepted: row {BAD_ROW} .* had {accepted}"):
        cache.raise_if_faulted()


def test_commit_skips_and_records_rows_sharing_a_slot():
    """Two live rows naming one slot: neither commits (the slot keeps its ring position), the record
    names the first; the other rows commit as without them."""
    cache, ins = _case(torch.float32)
    sbi = ins["state_batch_indices"].clone()
    sbi[3] = sbi[1]
    acc = torch.tensor([2, 3, 4, 1], dtype=torch.int32)
    clean = copy.deepcopy(cache)
    c_sbi = sbi.clone()
    c_sbi[[1, 3]] = clean.pad_slot_id
    clean.commit(c_sbi, acc, validate=False)
    cache.commit(sbi, acc, validate=False)
    _caches_equal(cache, clean)
    with pytest.raises(ValueError, match=rf"^state_batch_indices: row 1 .* had {int(sbi[1])}\b"):
        cache.raise_if_faulted()
    with pytest.raises(ValueError, match=r"^slots: .*"):         # the host check rejects them first
        cache.commit(sbi, acc, validate=True)


def test_commit_skips_and_records_a_slot_outside_the_pool():
    cache, ins = _case(torch.float32)
    sbi = ins["state_batch_indices"].clone()
    sbi[2] = 1000
    before = copy.deepcopy(cache)
    cache.commit(sbi, torch.tensor([1, 1, 1, 1], dtype=torch.int32), validate=False)
    for s in range(cache.num_slots):
        if s not in (int(sbi[0]), int(sbi[1]), int(sbi[3])):
            assert int(cache.pnat[s]) == int(before.pnat[s]) and int(cache.ring_start[s]) == int(before.ring_start[s])
    with pytest.raises(ValueError, match=r"^state_batch_indices: row 2 .* had 1000"):
        cache.raise_if_faulted()


def test_plan_kernel_and_torch_reference_agree_on_faults():
    cache, ins = _case(torch.float32)
    sbi = ins["state_batch_indices"].clone()
    sbi[0], sbi[3] = -7, cache.pad_slot_id
    cache.pnat[int(sbi[1])] = 40
    cache.ring_start[int(sbi[2])] = -4
    got = []
    for build in ("build", "build_reference"):
        plan, rec = StepPlan(4), flt.new_record("cpu")
        getattr(plan, build)(cache.pnat, sbi, cache.W, 4, cache.pad_slot_id, validate=False,
                             ring_start=cache.ring_start, ring_len=cache.L, max_pnat=16, faults=rec)
        got.append((plan.order.clone(), plan.slots.clone(), plan.counts.clone(), int(rec)))
    assert all(torch.equal(a, b) for a, b in zip(got[0][:3], got[1][:3])) and got[0][3] == got[1][3]
    assert got[0][2].tolist() == [0, 0]                     # every live row faulted: nothing to launch
    assert flt.decode(got[0][3]) == (0, flt.SLOT, -7)


@pytest.mark.parametrize("launch,state_dtype", [("split", torch.float32), ("split", torch.int8),
                                                ("dynamic", torch.float32), ("dynamic", torch.int8)])
def test_rows_sharing_a_slot_do_nothing_and_are_recorded(launch, state_dtype):
    """Two live rows on one slot (their steps would race on it), through the plan (split launch) or the
    fused launch's own scan of the slot ids: both do nothing, as padding rows, the record names the
    first and the slot; the other rows are unchanged."""
    cache, ins = _case(state_dtype)
    dirty = copy.deepcopy(cache)
    d_ins = dict(ins, state_batch_indices=ins["state_batch_indices"].clone(), out=ins["out"].clone())
    d_ins["state_batch_indices"][3] = d_ins["state_batch_indices"][1]
    shared = int(d_ins["state_batch_indices"][1])
    clean = copy.deepcopy(cache)
    c_ins = dict(d_ins, state_batch_indices=d_ins["state_batch_indices"].clone(), out=ins["out"].clone())
    c_ins["state_batch_indices"][[1, 3]] = clean.pad_slot_id
    checkpointing_ssu(**c_ins, **clean.op_kwargs(0), launch=launch, validate=False)
    checkpointing_ssu(**d_ins, **dirty.op_kwargs(0), launch=launch, validate=False)
    assert bool(d_ins["out"][[1, 3]].isnan().all()) and not d_ins["out"][[0, 2]].isnan().any()
    assert torch.equal(torch.nan_to_num(d_ins["out"]), torch.nan_to_num(c_ins["out"]))
    _caches_equal(dirty, clean)
    with pytest.raises(ValueError, match=rf"^state_batch_indices: row 1 .* had {shared}\b"):
        dirty.raise_if_faulted()


@pytest.mark.parametrize("seed", range(4))
def test_plan_kernel_and_torch_reference_agree_on_shared_slots(seed):
    """Random batches drawn from few slots (many shared), padding and pad ids among them: the kernel's
    order, slots, counts and record equal the torch reference's; no shared slot reaches a launch."""
    g = torch.Generator().manual_seed(seed)
    batch, num_slots = 37, 24
    sbi = torch.randint(0, num_slots, (batch,), generator=g, dtype=torch.int32)
    sbi[torch.randint(0, batch, (5,), generator=g)] = -1
    pnat = torch.randint(0, 17, (num_slots,), generator=g, dtype=torch.int32)
    ring_start = torch.randint(0, 20, (num_slots,), generator=g, dtype=torch.int32)
    got = []
    for build in ("build", "build_reference"):
        plan, rec = StepPlan(batch), flt.new_record("cpu")
        getattr(plan, build)(pnat, sbi, 16, 4, -1, validate=False, ring_start=ring_start, ring_len=20,
                             max_pnat=16, faults=rec)
        got.append((plan.order.clone(), plan.slots.clone(), plan.counts.clone(), int(rec)))
    assert all(torch.equal(a, b) for a, b in zip(got[0][:3], got[1][:3])) and got[0][3] == got[1][3]
    live = sbi[sbi >= 0]
    shared = {int(s) for s in live if int((live == s).sum()) > 1}
    n_live = int(got[0][2][1])
    launched = torch.cat([got[0][1][:int(got[0][2][0])], got[0][1][batch - (n_live - int(got[0][2][0])):]])
    assert n_live == len(live) - sum(int((live == s).sum()) for s in shared)
    assert not {int(s) for s in launched} & shared and len(set(launched.tolist())) == n_live
    first = min(i for i in range(batch) if int(sbi[i]) in shared)
    assert flt.decode(got[0][3]) == (first, flt.DUPLICATE_SLOT, int(sbi[first]))


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["dynamic", "split"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("field,value,name", [("slot", 100000, SBI), ("slot", -5, SBI), ("slot", 7, SBI),
                                              ("pnat", 10 ** 6, PN), ("ring_start", -1, RS)])
def test_gpu_a_bad_row_does_nothing_and_is_recorded(field, value, name, state_dtype, launch):
    """The device-side checks on sm_90 at Super TP8 shapes (on an H200 a slot id of 100000 or -5 used to
    end in an illegal memory access that killed the CUDA context)."""
    from tests.helpers.steps import to_device
    cache, ins = make_step(batch=48, slots=52, H=16, P=64, N=128, G=1, T=6, act=torch.bfloat16,
                           state_dtype=state_dtype, seed=73)
    cache, ins = to_device(cache, ins, "cuda")
    ins = dict(ins, state_batch_indices=ins["state_batch_indices"].clone())
    dirty = copy.deepcopy(cache)
    d_ins = _corrupt(dirty, ins, field, value if field != "slot" else {7: dirty.num_slots}.get(value, value))
    clean = copy.deepcopy(dirty)
    c_ins = dict(d_ins, state_batch_indices=d_ins["state_batch_indices"].clone(), out=ins["out"].clone())
    c_ins["state_batch_indices"][BAD_ROW] = clean.pad_slot_id
    checkpointing_ssu(**c_ins, **clean.op_kwargs(0), launch=launch, validate=False)
    checkpointing_ssu(**d_ins, **dirty.op_kwargs(0), launch=launch, validate=False)
    torch.cuda.synchronize()
    assert torch.equal(torch.nan_to_num(d_ins["out"]), torch.nan_to_num(c_ins["out"]))
    _caches_equal(dirty, clean)
    with pytest.raises(ValueError, match=rf"^{name}: row {BAD_ROW} "):
        dirty.raise_if_faulted()


def test_set_aside_pads_exactly_the_rows_a_step_sets_aside():
    """faults.set_aside (what the model path hands the conv update without host checks): random slot
    ids, pnat and ring_start with bad values and shared slots; a row keeps its slot iff its slot id is
    in the pool, its pnat in [0, max_pnat], its ring_start in [0, L) and no other row names the slot
    (checked row by row in Python)."""
    from specssm.cache import faults as flt
    gen = torch.Generator().manual_seed(7)
    S, L, max_pnat, pad = 12, 20, 16, -1
    pnat = torch.randint(-2, 19, (S,), generator=gen, dtype=torch.int32)
    rs = torch.randint(-2, 22, (S,), generator=gen, dtype=torch.int32)
    for _ in range(20):
        slots = torch.randint(-3, S + 3, (9,), generator=gen, dtype=torch.int32)
        got = flt.set_aside(slots, pnat, rs, pad, max_pnat, L)
        ids = slots.tolist()
        for r, s in enumerate(ids):
            ok = (s != pad and 0 <= s < S and 0 <= int(pnat[s]) <= max_pnat and 0 <= int(rs[s]) < L
                  and ids.count(s) == 1)
            assert int(got[r]) == (s if ok else pad), (r, s, ids)
        assert got.dtype == slots.dtype
