"""Varlen rows (`cu_seqlens`, `max_seqlen`) in the reference checkpointing step: each row flushes on
its own length and ends up exactly as if it had been run alone."""
import pytest
import torch

from specssm.reference import checkpointing_ssu_ref
from tests.helpers.steps import PAD, make_case, run_case, same_bits

W = 16


def test_flush_decision_uses_the_row_length():
    T = 6
    # slot: pnat, length -> pnat + len vs W (pnat + T would flush every one of them)
    plan = {0: (14, 2, False), 1: (14, 3, True), 2: (11, 5, False), 3: (11, 6, True), 4: (16, 1, True)}
    rows = [0, PAD, 1, 2, 3, 4]
    lengths = [plan[s][1] if s != PAD else 3 for s in rows]
    pnat = [plan[s][0] for s in range(5)]
    case = make_case(T=T, num_slots=5, rows=rows, lengths=lengths, pnat=pnat, varlen=True, seed=1)
    run_case(case, checkpointing_ssu_ref)
    for b, s in case.live_rows():
        assert case.writes(b) == plan[s][2]
        assert same_bits(case.state[s], case.before["state"][s]) == (not plan[s][2]), f"slot {s}"
    case.check()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [4, 6, 16])
def test_varlen_rows_equal_rows_run_alone(T, seed):
    gen = torch.Generator().manual_seed(seed)
    num_slots = 6
    rows = [3, PAD, 0, 5, 1, PAD, 2]
    lengths = [T, 2, 1, 0, max(T - 1, 1), T, int(torch.randint(1, T + 1, (), generator=gen))]
    pnat = torch.randint(0, max(W, T) + 1, (num_slots,), generator=gen).tolist()
    case = make_case(T=T, num_slots=num_slots, rows=rows, lengths=lengths, pnat=pnat, varlen=True,
                     seed=20 + seed)
    run_case(case, checkpointing_ssu_ref)
    case.check()
    for b, s in case.live_rows():
        n = lengths[b]
        if n == 0:
            continue
        alone = make_case(T=T, num_slots=num_slots, rows=rows, lengths=lengths, pnat=pnat, varlen=True,
                          seed=20 + seed)
        tok = alone.tokens(b)
        out = torch.full_like(alone.x[tok][None], float("nan"))
        kw = dict(alone.kwargs(), x=alone.x[tok][None], dt=alone.dt[tok][None], B=alone.B[tok][None],
                  C=alone.C[tok][None], z=alone.z[tok][None], out=out, cu_seqlens=None, max_seqlen=None,
                  state_batch_indices=torch.tensor([s], dtype=torch.int32))
        checkpointing_ssu_ref(**kw)
        assert same_bits(out[0], case.out[tok]), f"row {b}: outputs differ from the row run alone"
        for nm in ("state", "x_cache", "B_cache", "dt_cache"):
            assert same_bits(getattr(alone, nm)[s], getattr(case, nm)[s]), f"row {b}: {nm} differs"


def test_varlen_with_8bit_state():
    case = make_case(T=6, num_slots=4, rows=[2, 0, PAD, 3, 1], lengths=[6, 2, 4, 1, 3], pnat=[14, 3, 11, 16],
                     varlen=True, state_dtype=torch.int8, seed=3)
    run_case(case, checkpointing_ssu_ref)
    assert {case.writes(b) for b, _ in case.live_rows()} == {True, False}
    case.check()
