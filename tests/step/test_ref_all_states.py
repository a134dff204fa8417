"""The all-states baseline: reads states[s, state_index[s]], writes all T intermediate states."""
import pytest
import torch

from specssm.reference import all_states_ssu_ref
from specssm.reference import recurrence as rec
from tests.helpers.steps import PAD, make_case, rel_err, same_bits, softplus_dt


def make(T, slots=5, rows=(3, PAD, 0, 4, 1), dtype=torch.float64, seed=0):
    """All-states cache and inputs of one step (float64 activations, states in `dtype`)."""
    return make_case(strategy="all_states", T=T, num_slots=slots, rows=list(rows), state_dtype=dtype,
                     seed=seed).kwargs()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("T", [1, 4, 6])
def test_all_states_matches_sequential(T, dtype, tol):
    kw = make(T, dtype=dtype, seed=T)
    before = {k: kw[k].clone() for k in ("states", "state_index", "out")}
    all_states_ssu_ref(**kw)
    rows = kw["state_batch_indices"].tolist()
    A, D = kw["A"][:, 0, 0], kw["D"][:, 0]
    for b, s in enumerate(rows):
        if s == PAD:
            assert same_bits(kw["out"][b], before["out"][b]), f"pad row {b} wrote outputs"
            continue
        h = before["states"][s, int(before["state_index"][s])].double()
        dt = softplus_dt(kw["dt"][b, ..., 0], kw["dt_bias"][:, 0])
        y, _ = rec.sequential(h, kw["x"][b], dt, A, kw["B"][b], kw["C"][b], D, kw["z"][b])
        assert rel_err(kw["out"][b], y) <= tol
        for t in range(T):
            _, h = rec.sequential(h, kw["x"][b, t:t + 1], dt[t:t + 1], A, kw["B"][b, t:t + 1], kw["C"][b, t:t + 1])
            assert rel_err(kw["states"][s, t], h) <= tol, f"row {b} state {t}"
    others = [s for s in range(kw["states"].shape[0]) if s not in rows]
    assert same_bits(kw["states"][others], before["states"][others])
    assert same_bits(kw["state_index"], before["state_index"])
