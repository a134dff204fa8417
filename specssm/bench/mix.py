"""The mix of write / no-write rows a benchmark step sees (benchmarks/README.md, "What is measured": mix of writes).

A slot's `pnat` (history length K) follows the Markov chain of the commit (docs/design.md, "The closed form"):

    pnat' = acc            if pnat + T > W     (the step flushed: the history restarts)
    pnat' = pnat + acc     otherwise

with `acc` (accepted tokens, 1..T) drawn from an acceptance histogram. The benchmark samples each row's
`pnat` from the chain's stationary distribution, so a step has the write fraction and the history lengths
a long-running server sees. Everything here is pure (numpy only) and runs on a CPU.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# Accepted-length counts for T = 6, the benchmarks' default: write fraction ~0.31, mean pnat ~8.0 at W = 16.
DEFAULT_ACCEPTANCE = {1: 539622, 2: 329144, 3: 336224, 4: 495832, 5: 444398, 6: 1007008}

SCENARIOS = ("mixed", "all_write", "all_no_write")


def acceptance_probs(hist: dict, T: int) -> np.ndarray:
    """Histogram {acc: count} -> probabilities `p[acc]` of length T + 1 (p[0] = 0).

    A histogram measured for a longer draft is cut at T: counts of acc > T are folded into acc = T
    (a row cannot accept more tokens than it verified).
    """
    if T < 1:
        raise ValueError(f"T: expected >= 1, got {T}")
    p = np.zeros(T + 1, dtype=np.float64)
    for acc, count in hist.items():
        acc, count = int(acc), float(count)
        if acc < 1:
            raise ValueError(f"hist: expected accepted lengths >= 1, got {acc}")
        if count < 0:
            raise ValueError(f"hist: expected counts >= 0, got {count} for accepted length {acc}")
        p[min(acc, T)] += count
    total = p.sum()
    if total <= 0:
        raise ValueError(f"hist: expected a positive total count, got {total}")
    return p / total


def transition_matrix(p_acc: np.ndarray, T: int, W: int) -> np.ndarray:
    """Row-stochastic matrix `M[k, k']` of the pnat chain on states 0..max(W, T)."""
    kmax = max(W, T)
    M = np.zeros((kmax + 1, kmax + 1), dtype=np.float64)
    for k in range(kmax + 1):
        flush = k + T > W
        for acc in range(1, T + 1):
            if p_acc[acc] == 0:
                continue
            M[k, acc if flush else k + acc] += p_acc[acc]
    return M


def stationary_pnat(hist: dict, T: int, W: int) -> np.ndarray:
    """Stationary distribution `pi[k]`, k = 0..max(W, T), of the pnat chain (exact linear solve).

    Every path of the chain flushes eventually and every flush leads to the same set of states, so
    there is one recurrent class and the solution is unique; state 0 (a fresh slot) is transient.
    """
    if W < 0:
        raise ValueError(f"W: expected >= 0, got {W}")
    M = transition_matrix(acceptance_probs(hist, T), T, W)
    n = M.shape[0]
    # pi (M - I) = 0 and sum(pi) = 1, as one overdetermined but consistent system
    lhs = np.vstack([M.T - np.eye(n), np.ones((1, n))])
    rhs = np.zeros(n + 1)
    rhs[-1] = 1.0
    pi, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def write_fraction(pi: np.ndarray, T: int, W: int) -> float:
    """Probability that a row flushes (pnat + T > W) under the distribution `pi` over pnat."""
    k = np.arange(len(pi))
    return float(pi[k + T > W].sum())


def mean_pnat(pi: np.ndarray) -> float:
    return float((np.arange(len(pi)) * pi).sum())


def scenario_distribution(scenario: str, hist: dict, T: int, W: int) -> np.ndarray:
    """Distribution of pnat for a scenario.

    mixed: the stationary distribution. all_write / all_no_write: the stationary distribution
    conditioned on the row flushing / not flushing, so history lengths stay realistic. Raises
    ValueError when the condition has probability 0 (e.g. all_no_write with T > W).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {SCENARIOS}, got {scenario!r}")
    pi = stationary_pnat(hist, T, W)
    if scenario == "mixed":
        return pi
    k = np.arange(len(pi))
    keep = (k + T > W) if scenario == "all_write" else (k + T <= W)
    q = np.where(keep, pi, 0.0)
    if q.sum() <= 0:
        raise ValueError(f"scenario: {scenario!r} is impossible for T={T}, W={W} with this histogram")
    return q / q.sum()


def sample(dist: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n i.i.d. draws of the index of `dist` (int32)."""
    return rng.choice(len(dist), size=n, p=dist).astype(np.int32)


def sample_pnat(scenario: str, n: int, hist: dict, T: int, W: int, seed: int = 0) -> np.ndarray:
    """pnat of n rows for a scenario of the checkpointing strategy (W = 0 gives always-write)."""
    return sample(scenario_distribution(scenario, hist, T, W), n, np.random.default_rng(seed))


def sample_accepted(n: int, hist: dict, T: int, seed: int = 0) -> np.ndarray:
    """n accepted lengths in [1, T] drawn from the histogram (int32)."""
    return sample(acceptance_probs(hist, T), n, np.random.default_rng(seed))


def load_histogram_csv(path) -> dict:
    """Read an acceptance histogram: rows `accepted,count` (an optional header line is skipped)."""
    hist: dict[int, float] = {}
    with open(Path(path), newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                acc, count = int(row[0]), float(row[1])
            except (ValueError, IndexError):
                if i == 0:
                    continue  # header
                raise ValueError(f"histogram {path}: expected rows 'accepted,count', got {row!r} "
                                 f"at line {i + 1}") from None
            hist[acc] = hist.get(acc, 0.0) + count
    if not hist:
        raise ValueError(f"histogram {path}: expected rows 'accepted,count', got none")
    return hist
