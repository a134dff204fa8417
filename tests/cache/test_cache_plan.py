"""StepPlan: per-row write flags, the stable order (writes, padding, no-writes), the slot of each entry,
the counts, and one plan object reused across steps of different batch sizes."""
import pytest
import torch

from specssm.cache import StepPlan

PAD = -1


def expected_plan(pnat, rows, W, lens):
    """docs/design.md ("Kernels": Plan) in plain Python: writes (pnat + len > W) first, then padding, then
    no-writes (which the step's no-write launch reads from the end), each group in row order."""
    flags = [int(s != PAD and pnat[s] + n > W) for s, n in zip(rows, lens)]
    writes = [b for b, s in enumerate(rows) if s != PAD and flags[b]]
    stays = [b for b, s in enumerate(rows) if s != PAD and not flags[b]]
    pads = [b for b, s in enumerate(rows) if s == PAD]
    return flags, writes + pads + stays, [len(writes), len(writes) + len(stays)]


def random_step(gen, num_slots, batch, T, W, p_pad):
    pnat = torch.randint(0, max(W, T) + 1, (num_slots,), generator=gen, dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=gen)[:batch]
    pad = torch.rand(batch, generator=gen) < p_pad
    rows = torch.where(pad, PAD, slots).to(torch.int32)
    return pnat, rows


def check(plan, pnat, rows, W, lens):
    flags, order, counts = expected_plan(pnat.tolist(), rows.tolist(), W, lens)
    b = len(rows)
    assert plan.batch == b
    assert plan.write_flag[:b].tolist() == flags
    assert plan.order[:b].tolist() == order
    assert plan.slots[:b].tolist() == [rows.tolist()[r] for r in order]
    assert plan.counts.tolist() == counts
    assert plan.n_writes.tolist() == counts[:1]
    for t in (plan.write_flag, plan.order, plan.slots, plan.counts):
        assert t.dtype == torch.int32


@pytest.mark.parametrize("T,W", [(1, 16), (4, 16), (6, 16), (16, 16), (6, 0)])
@pytest.mark.parametrize("p_pad", [0.0, 0.3, 1.0])
def test_random_mixes(T, W, p_pad):
    gen = torch.Generator().manual_seed(T * 7 + W)
    plan = StepPlan(32)
    for _ in range(20):
        batch = int(torch.randint(1, 33, (), generator=gen))
        pnat, rows = random_step(gen, 40, batch, T, W, p_pad)
        plan.build(pnat, rows, W, T)
        check(plan, pnat, rows, W, [T] * batch)


def test_varlen_lengths():
    gen = torch.Generator().manual_seed(1)
    plan = StepPlan(16)
    for _ in range(20):
        pnat, rows = random_step(gen, 20, 16, 6, 16, 0.2)
        lens = torch.randint(0, 7, (16,), generator=gen)
        plan.build(pnat, rows, 16, lens)
        check(plan, pnat, rows, 16, lens.tolist())


def test_boundary_and_stable_order():
    """pnat = W - T stays, W - T + 1 writes; equal rows keep their order inside each group."""
    T, W = 6, 16
    pnat = torch.tensor([W - T, W - T + 1, 0, 16, 3], dtype=torch.int32)
    rows = torch.tensor([PAD, 0, 1, 2, PAD, 3, 4], dtype=torch.int32)
    plan = StepPlan(8).build(pnat, rows, W, T)
    assert plan.write_flag[:7].tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert plan.order[:7].tolist() == [2, 5, 0, 4, 1, 3, 6]
    assert plan.slots[:7].tolist() == [1, 3, PAD, PAD, 0, 2, 4]
    assert plan.counts.tolist() == [2, 5]


def test_one_plan_reused_across_batch_sizes():
    """Shrinking and growing batches: each build is exactly the plan of its own rows."""
    gen = torch.Generator().manual_seed(2)
    plan = StepPlan(24)
    for batch in (24, 3, 17, 1, 24, 8):
        pnat, rows = random_step(gen, 30, batch, 4, 16, 0.25)
        assert plan.build(pnat, rows, 16, 4) is plan
        check(plan, pnat, rows, 16, [4] * batch)
        assert sorted(plan.order[:batch].tolist()) == list(range(batch))


def test_int64_indices_and_empty_batch():
    pnat = torch.tensor([15, 2], dtype=torch.int32)
    plan = StepPlan(4).build(pnat, torch.tensor([1, 0], dtype=torch.int64), 16, 4)
    assert plan.order[:2].tolist() == [1, 0] and plan.counts.tolist() == [1, 2]
    plan.build(pnat, torch.zeros(0, dtype=torch.int32), 16, 4)
    assert plan.batch == 0 and plan.counts.tolist() == [0, 0]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match=r"^max_batch:"):
        StepPlan(0)


META = torch.device("meta")
PNAT = torch.tensor([3, 12, 15, 0], dtype=torch.int32)
ROWS = torch.tensor([2, PAD, 0, 1], dtype=torch.int32)

BAD = {
    "rows: float": (dict(state_batch_indices=ROWS.float()), "state_batch_indices"),
    "rows: 2-D": (dict(state_batch_indices=ROWS[None]), "state_batch_indices"),
    "rows: meta device": (dict(state_batch_indices=ROWS.to(META)), "state_batch_indices"),
    "rows: more than max_batch": (dict(state_batch_indices=torch.tensor([0, 1, 2, 3, PAD], dtype=torch.int32)),
                                  "state_batch_indices"),
    "rows: slot out of range": (dict(state_batch_indices=torch.tensor([2, PAD, 4, 1], dtype=torch.int32)),
                                "state_batch_indices"),
    "rows: negative slot other than pad": (dict(state_batch_indices=torch.tensor([2, -3, 0, 1], dtype=torch.int32)),
                                           "state_batch_indices"),
    "rows: duplicate slots": (dict(state_batch_indices=torch.tensor([2, PAD, 2, 1], dtype=torch.int32)),
                              "state_batch_indices"),
    "pnat: float": (dict(pnat=PNAT.float()), "pnat"),
    "pnat: 2-D": (dict(pnat=PNAT[None]), "pnat"),
    "pnat: meta device": (dict(pnat=PNAT.to(META)), "pnat"),
    "num_tokens: wrong length": (dict(num_tokens=torch.tensor([4, 4, 4])), "num_tokens"),
    "num_tokens: float": (dict(num_tokens=torch.tensor([4.0, 4, 4, 4])), "num_tokens"),
    "num_tokens: 0": (dict(num_tokens=0), "num_tokens"),
    "window 17": (dict(window=17), "window"),
    "window -1": (dict(window=-1), "window"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input(what):
    change, name = BAD[what]
    plan = StepPlan(4)
    plan.build(PNAT, ROWS, 16, 4)
    before = [plan.write_flag.clone(), plan.order.clone(), plan.counts.clone(), plan.batch]
    pnat = PNAT.clone()
    kw = dict(pnat=pnat, state_batch_indices=ROWS, window=16, num_tokens=4)
    kw.update(change)
    with pytest.raises((ValueError, TypeError)) as e:
        plan.build(**kw)
    assert str(e.value).startswith(f"{name}:"), f"message should name {name!r}: {e.value}"
    after = [plan.write_flag, plan.order, plan.counts]
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after)), "a rejected build changed the plan"
    assert plan.batch == before[3] and torch.equal(pnat, PNAT)


def test_validate_false_skips_the_host_check():
    """validate=False: no host sync (CUDA-graph capture); slot ids are then the caller's business."""
    plan = StepPlan(4).build(PNAT, torch.tensor([2, PAD, 2, 1], dtype=torch.int32), 16, 4, validate=False)
    assert plan.batch == 4
