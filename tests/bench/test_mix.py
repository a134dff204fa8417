"""The pnat mix: stationary distribution of the commit chain, scenarios, sampling, histogram files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specssm.bench import mix
from specssm.cache import SSMCache


def test_default_histogram_matches_design_numbers():
    pi = mix.stationary_pnat(mix.DEFAULT_ACCEPTANCE, T=6, W=16)
    assert pi.shape == (17,)
    assert pi.sum() == pytest.approx(1.0)
    assert pi[0] == pytest.approx(0.0, abs=1e-12)          # a fresh slot is transient
    assert mix.write_fraction(pi, 6, 16) == pytest.approx(0.31, abs=0.005)
    assert mix.mean_pnat(pi) == pytest.approx(8.0, abs=0.06)


@pytest.mark.parametrize("T,W", [(6, 16), (4, 16), (3, 5), (6, 4), (2, 0)])
def test_stationary_is_fixed_point_and_matches_power_iteration(T, W):
    hist = {1: 3, 2: 1, 3: 5, 4: 2, 5: 1, 6: 7}
    pi = mix.stationary_pnat(hist, T, W)
    M = mix.transition_matrix(mix.acceptance_probs(hist, T), T, W)
    np.testing.assert_allclose(pi @ M, pi, atol=1e-12)
    # power iteration from a fresh slot (pnat 0), averaged over a period to damp periodic chains
    v = np.zeros(len(pi))
    v[0] = 1.0
    for _ in range(3000):
        v = v @ M
    avg = np.zeros_like(v)
    for _ in range(60):
        v = v @ M
        avg += v / 60
    np.testing.assert_allclose(avg, pi, atol=1e-6)


def test_always_write_chain_is_the_acceptance_histogram():
    hist = {1: 1, 2: 2, 3: 3, 4: 4}
    pi = mix.stationary_pnat(hist, T=4, W=0)
    np.testing.assert_allclose(pi[1:5], np.array([1, 2, 3, 4]) / 10)
    assert mix.write_fraction(pi, 4, 0) == pytest.approx(1.0)


def test_stationary_matches_the_cache_commit():
    """Drive SSMCache.commit (the real commit rule, not this module's chain) with accepted lengths drawn
    from the histogram; the pnat histogram of many slots after a burn-in matches the stationary law."""
    T, W, slots, steps = 6, 16, 4000, 60
    cache = SSMCache(1, slots, 1, 1, 1, 1, max_tokens=T, window=W)
    idx = torch.arange(slots, dtype=torch.int32)
    rng = np.random.default_rng(0)
    p = mix.acceptance_probs(mix.DEFAULT_ACCEPTANCE, T)
    counts = np.zeros(max(W, T) + 1)
    for step in range(steps):
        acc = torch.from_numpy(rng.choice(T + 1, size=slots, p=p).astype(np.int32))
        cache.commit(idx, acc, validate=False)
        if step >= 20:
            counts += np.bincount(cache.pnat.numpy(), minlength=len(counts))
    empirical = counts / counts.sum()
    pi = mix.stationary_pnat(mix.DEFAULT_ACCEPTANCE, T, W)
    np.testing.assert_allclose(empirical, pi, atol=0.005)


def test_scenarios_condition_on_the_write_flag():
    T, W = 6, 16
    k = np.arange(17)
    w = mix.scenario_distribution("all_write", mix.DEFAULT_ACCEPTANCE, T, W)
    nw = mix.scenario_distribution("all_no_write", mix.DEFAULT_ACCEPTANCE, T, W)
    assert w.sum() == pytest.approx(1) and nw.sum() == pytest.approx(1)
    assert np.all(w[k + T <= W] == 0) and np.all(nw[k + T > W] == 0)
    pi = mix.stationary_pnat(mix.DEFAULT_ACCEPTANCE, T, W)
    np.testing.assert_allclose(w[k + T > W], pi[k + T > W] / pi[k + T > W].sum())
    with pytest.raises(ValueError, match="all_no_write"):
        mix.scenario_distribution("all_no_write", mix.DEFAULT_ACCEPTANCE, 6, 4)
    with pytest.raises(ValueError, match="scenario"):
        mix.scenario_distribution("sometimes", mix.DEFAULT_ACCEPTANCE, T, W)


def test_sampler_is_deterministic_and_follows_the_law():
    a = mix.sample_pnat("mixed", 20000, mix.DEFAULT_ACCEPTANCE, 6, 16, seed=3)
    b = mix.sample_pnat("mixed", 20000, mix.DEFAULT_ACCEPTANCE, 6, 16, seed=3)
    assert a.dtype == np.int32 and np.array_equal(a, b)
    assert a.min() >= 1 and a.max() <= 16
    assert np.mean(a + 6 > 16) == pytest.approx(0.31, abs=0.015)
    assert a.mean() == pytest.approx(8.0, abs=0.1)
    acc = mix.sample_accepted(1000, {2: 1, 3: 1}, T=6, seed=1)
    assert set(np.unique(acc)) == {2, 3}


def test_histogram_longer_than_T_folds_into_T_and_bad_input_raises():
    p = mix.acceptance_probs({1: 1, 5: 1, 7: 2}, T=4)
    np.testing.assert_allclose(p, [0, 0.25, 0, 0, 0.75])
    with pytest.raises(ValueError, match="hist"):
        mix.acceptance_probs({0: 1}, 4)
    with pytest.raises(ValueError, match="hist"):
        mix.acceptance_probs({1: 0}, 4)


def test_load_histogram_csv(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("accepted,count\n1,10\n2,30\n# comment\n2,10\n")
    assert mix.load_histogram_csv(f) == {1: 10.0, 2: 40.0}
    bad = tmp_path / "bad.csv"
    bad.write_text("1,10\nx,y\n")
    with pytest.raises(ValueError, match="accepted,count"):
        mix.load_histogram_csv(bad)
