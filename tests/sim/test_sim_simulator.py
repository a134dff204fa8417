"""The speculative-decoding simulator drives the float64 references for 200+ steps and checks every
accepted output and the implied state against the sequential recurrence (<= 1e-10 relative).

These tests run it in the regimes that matter (writes happening at a realistic rate; heavy slot reuse
with padding rows; the baselines), check that the run really was in that regime, and check that the
simulator catches broken step ops.
"""
import functools

import pytest
import torch

from specssm.reference import all_states_ssu_ref, always_write_ssu_ref, checkpointing_ssu_ref
from specssm.sim import simulate

W = 16
SMALL = dict(H=2, P=4, N=4, G=2, layers=2, batch=6, num_slots=8)     # ~1-2 s per 200 steps


def stationary_write_fraction(T, W):
    """Write fraction of the chain pnat' = acc if pnat + T > W else pnat + acc, acc uniform in [1, T]."""
    n = max(W, T) + 1
    M = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        for a in range(1, T + 1):
            M[k, a if k + T > W else k + a] += 1.0 / T
    pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(2000):
        pi = pi @ M
    return float(sum(pi[k] for k in range(n) if k + T > W))


@pytest.mark.parametrize("form", ["replay", "rectangle"])
@pytest.mark.parametrize("T", [4, 6])
def test_low_churn_writes_at_the_chain_rate(T, form):
    ssu = functools.partial(checkpointing_ssu_ref, no_write_form=form)
    rep = simulate(ssu, steps=200, T=T, window=W, p_churn=0.01, p_pad=0.05, seed=T, **SMALL)
    assert rep.steps == 200 and rep.rows >= 200 * 5
    assert rep.max_out_err <= 1e-10 and rep.max_state_err <= 1e-10
    wf = rep.writes / rep.rows
    assert 0.15 <= wf <= 0.45, f"write fraction {wf:.2f}: the run did not exercise both branches"
    assert abs(wf - stationary_write_fraction(T, W)) <= 0.06
    # the whole history range was visited, and never beyond the window
    assert max(rep.pnat_hist) == W and min(rep.pnat_hist) == 0
    assert len(rep.pnat_hist) == W + 1


def test_high_churn_and_padding():
    rep = simulate(checkpointing_ssu_ref, steps=200, T=4, window=W, p_churn=0.3, p_pad=0.3, seed=1, **SMALL)
    assert rep.churned >= 100 and rep.pad_rows >= 100
    assert rep.writes > 0 and rep.writes < rep.rows
    assert rep.max_out_err <= 1e-10 and rep.max_state_err <= 1e-10


def test_full_window_T16():
    """T = 16 with W = 16: L = 32, a row writes whenever it has any history."""
    rep = simulate(checkpointing_ssu_ref, steps=60, T=16, window=W, p_churn=0.05, p_pad=0.2, seed=2, **SMALL)
    assert 0 < rep.writes < rep.rows and max(rep.pnat_hist) == 16


@pytest.mark.parametrize("ssu", [checkpointing_ssu_ref, always_write_ssu_ref])
def test_always_write(ssu):
    rep = simulate(ssu, steps=200, T=4, strategy="always_write", p_churn=0.1, p_pad=0.2, seed=3, **SMALL)
    assert rep.writes == rep.rows and rep.churned > 0 and rep.pad_rows > 0
    assert max(rep.pnat_hist) <= 4


def test_all_states():
    rep = simulate(all_states_ssu_ref, steps=200, T=4, strategy="all_states", p_churn=0.1, p_pad=0.2, seed=4,
                   **SMALL)
    assert rep.steps == 200 and rep.churned > 0 and rep.pad_rows > 0
    assert rep.max_out_err <= 1e-10 and rep.max_state_err <= 1e-10


def test_float32_run():
    rep = simulate(checkpointing_ssu_ref, steps=40, T=4, dtype=torch.float32, p_churn=0.05, p_pad=0.1, seed=5,
                   **SMALL)
    assert rep.max_out_err <= 2e-2 and rep.max_state_err <= 2e-2


def test_summary_mentions_what_was_checked():
    rep = simulate(checkpointing_ssu_ref, steps=5, T=4, seed=6, **SMALL)
    s = rep.summary()
    assert "5 steps" in s and "write fraction" in s


# ---- the simulator catches broken ops ---------------------------------------------------------

def never_writes(**kw):
    """Forgets to store the flushed state."""
    state = kw["state"].clone()
    checkpointing_ssu_ref(**kw)
    kw["state"].copy_(state)


def forgets_appends(**kw):
    x_cache = kw["x_cache"].clone()
    checkpointing_ssu_ref(**kw)
    kw["x_cache"].copy_(x_cache)


def writes_padding_rows(**kw):
    checkpointing_ssu_ref(**kw)
    kw["out"].nan_to_num_(0.0)


def flushes_one_early(**kw):
    """Writes at pnat + T > W - 1, while the commit flushes at pnat + T > W."""
    checkpointing_ssu_ref(**dict(kw, window=kw["window"] - 1))


def slightly_off(**kw):
    checkpointing_ssu_ref(**kw)
    kw["out"].mul_(1 + 1e-8)


@pytest.mark.parametrize("broken", [never_writes, forgets_appends, writes_padding_rows, flushes_one_early,
                                    slightly_off])
def test_simulator_catches_broken_ops(broken):
    with pytest.raises(AssertionError):
        simulate(broken, steps=60, T=4, window=W, p_churn=0.02, p_pad=0.3, seed=7, **SMALL)


def test_simulator_checks_the_implied_state_after_the_commit():
    """One step: the outputs are right, but the ring lost the new tokens, so the state implied after
    the commit is wrong, and only the implied-state check can see it."""
    with pytest.raises(AssertionError, match="implied-state"):
        simulate(forgets_appends, steps=1, T=4, window=W, p_churn=0.0, p_pad=0.0, seed=8, **SMALL)
