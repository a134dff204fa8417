"""The float64 recurrence and its closed forms (docs/design.md, "The closed form").

The ground truth here is a scalar loop written straight from the §3 formulas; `sequential` is checked
against it, and every closed form (fold, triangle, rectangle) against `sequential`.
"""
import math

import pytest
import torch

from specssm.reference import recurrence as rec

W = 16


def rand_inputs(K, T, H=4, P=3, N=5, G=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)       # noqa: E731
    u = lambda lo, hi, *s: torch.empty(*s, dtype=torch.float64).uniform_(lo, hi, generator=gen)  # noqa: E731
    return dict(S=r(H, P, N), A=-torch.exp(u(-1, 1, H)), D=r(H),
                x_hist=r(K, H, P), dt_hist=u(0.01, 0.5, K, H), B_hist=r(K, G, N),
                x=r(T, H, P), dt=u(0.01, 0.5, T, H), B=r(T, G, N), C=r(T, G, N), z=r(T, H, P))


def scalar_loop(S, x, dt, A, B, C, D, z):
    """h_t = exp(A dt_t) h_{t-1} + dt_t x_t[p] B_t[n];  y_t = sum_n C_t[n] h_t[p, n] + D x_t[p], gated."""
    T, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    h = S.tolist()
    y = [[[0.0] * P for _ in range(H)] for _ in range(T)]
    for t in range(T):
        for hd in range(H):
            g = hd // (H // G)
            decay = math.exp(float(A[hd]) * float(dt[t, hd]))
            for p in range(P):
                acc = 0.0
                for n in range(N):
                    h[hd][p][n] = decay * h[hd][p][n] + float(dt[t, hd]) * float(x[t, hd, p]) * float(B[t, g, n])
                    acc += float(C[t, g, n]) * h[hd][p][n]
                v = acc + float(D[hd]) * float(x[t, hd, p])
                zz = float(z[t, hd, p])
                y[t][hd][p] = v * zz / (1.0 + math.exp(-zz))
    return torch.tensor(y, dtype=torch.float64), torch.tensor(h, dtype=torch.float64)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("G", [1, 2, 4])
def test_sequential_equals_scalar_loop(G):
    d = rand_inputs(0, 5, H=4, G=G, seed=G)
    y, h = rec.sequential(d["S"], d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"])
    y0, h0 = scalar_loop(d["S"], d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], d["z"])
    assert rel(y, y0) <= 1e-13 and rel(h, h0) <= 1e-13


def test_head_reads_its_group():
    """Head h uses group h // (H / G): from a zero state, one token gives h = dt x (x) B[group]."""
    H, G, P, N = 8, 4, 2, 3
    B = torch.arange(G * N, dtype=torch.float64).reshape(1, G, N) + 1
    x, dt = torch.ones(1, H, P, dtype=torch.float64), torch.ones(1, H, dtype=torch.float64)
    _, h = rec.sequential(torch.zeros(H, P, N, dtype=torch.float64), x, dt, -torch.ones(H), B, B)
    for hd in range(H):
        assert torch.equal(h[hd, 0], B[0, hd // (H // G)])


def test_sequential_of_no_tokens_keeps_the_state():
    d = rand_inputs(0, 0)
    y, h = rec.sequential(d["S"], d["x"], d["dt"], d["A"], d["B"], d["C"])
    assert y.shape == (0, 4, 3) and torch.equal(h, d["S"])


@pytest.mark.parametrize("K", [0, 1, 7, 16])
def test_fold_equals_sequential_state(K):
    d = rand_inputs(K, 0, seed=K)
    _, h = rec.sequential(d["S"], d["x_hist"], d["dt_hist"], d["A"], d["B_hist"], d["B_hist"])
    assert rel(rec.fold(d["S"], d["x_hist"], d["dt_hist"], d["A"], d["B_hist"]), h) <= 1e-12


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 4, 6, 16])
def test_triangle_equals_sequential_outputs(T, gated):
    d = rand_inputs(0, T, seed=T)
    z = d["z"] if gated else None
    y, _ = rec.sequential(d["S"], d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], z)
    assert rel(rec.outputs_triangle(d["S"], d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], z), y) <= 1e-12


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,K", [(1, 0), (1, 7), (1, 15), (4, 0), (4, 1), (4, 12), (6, 5), (6, 10),
                                 (16, 0)])
def test_rectangle_equals_triangle_of_folded_state(T, K, gated):
    """No-write form: history + new tokens on one key axis equals replaying from fold(S, history)."""
    assert K + T <= W
    d = rand_inputs(K, T, seed=10 * T + K)
    z = d["z"] if gated else None
    hK = rec.fold(d["S"], d["x_hist"], d["dt_hist"], d["A"], d["B_hist"])
    tri = rec.outputs_triangle(hK, d["x"], d["dt"], d["A"], d["B"], d["C"], d["D"], z)
    rect = rec.outputs_rectangle(d["S"], d["x_hist"], d["dt_hist"], d["B_hist"], d["x"], d["dt"], d["A"],
                                 d["B"], d["C"], d["D"], z)
    assert rel(rect, tri) <= 1e-12


def test_process_dt():
    raw = torch.tensor([[-30.0, -1.0, 0.0, 19.5, 20.5, 40.0]], dtype=torch.float32)
    bias = torch.tensor([0.5] * 6, dtype=torch.float32)
    assert torch.equal(rec.process_dt(raw), raw.double())
    assert torch.equal(rec.process_dt(raw, bias), raw.double() + 0.5)
    got = rec.process_dt(raw, bias, dt_softplus=True)
    v = raw.double() + 0.5
    want = torch.tensor([[math.log1p(math.exp(e)) if e <= 20 else e for e in v[0].tolist()]], dtype=torch.float64)
    assert got.dtype == torch.float64
    assert rel(got, want) <= 1e-15
    assert torch.equal(got[0, 4:], v[0, 4:])          # softplus(v) = v exactly for v > 20


def test_gate():
    y = torch.randn(3, 2, dtype=torch.float64)
    z = torch.randn(3, 2, dtype=torch.float64)
    assert rec.gate(y, None) is y
    assert rel(rec.gate(y, z), y * z / (1 + torch.exp(-z))) <= 1e-15
