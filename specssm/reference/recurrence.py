"""The Mamba2 recurrence, token by token and in closed form (float64 specification).

Shapes for one row: state `(H, P, N)`, x `(T, H, P)`, dt `(T, H)` (raw, before bias/softplus) or
processed, A/D/dt_bias `(H,)`, B/C `(T, G, N)`, z `(T, H, P)`. Head h reads group h // (H // G).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def process_dt(dt_raw, dt_bias=None, dt_softplus=False):
    """dt as the kernels use it: fp32-exact in float64; softplus(v) = v for v > 20 (as Mamba2)."""
    v = dt_raw.double()
    if dt_bias is not None:
        v = v + dt_bias.double()
    if dt_softplus:
        v = torch.where(v > 20.0, v, F.softplus(v))
    return v


def heads_of_groups(t, H):
    """(..., G, N) -> (..., H, N): each head sees its group's vector."""
    G = t.shape[-2]
    return t.repeat_interleave(H // G, dim=-2)


def gate(y, z):
    if z is None:
        return y
    z = z.double()
    return y * z * torch.sigmoid(z)


def sequential(state, x, dt, A, B, C, D=None, z=None):
    """Token-by-token recurrence from `state` over processed dt. Returns (y (T,H,P), h (H,P,N))."""
    H = x.shape[1]
    h = state.double().clone()
    Bh, Ch = heads_of_groups(B.double(), H), heads_of_groups(C.double(), H)
    ys = []
    for t in range(x.shape[0]):
        dA = torch.exp(A.double() * dt[t])                                  # (H,)
        h = dA[:, None, None] * h + (dt[t][:, None] * x[t].double())[:, :, None] * Bh[t][:, None, :]
        y = torch.einsum("hpn,hn->hp", h, Ch[t])
        if D is not None:
            y = y + D.double()[:, None] * x[t].double()
        ys.append(y)
    y = torch.stack(ys) if ys else x.double().new_zeros(x.shape)
    return gate(y, z), h


def fold(state, x, dt, A, B):
    """Closed form of the state after a run of tokens: exp(Λ)·S + Σ_k exp(Λ − c_k)·dt_k·x_k⊗B_k."""
    H = x.shape[1]
    c = torch.cumsum(A.double()[None] * dt, dim=0)                         # (K, H)
    lam = c[-1] if c.shape[0] else torch.zeros_like(A.double())
    w = torch.exp(lam[None] - c) * dt                                        # (K, H)
    Bh = heads_of_groups(B.double(), H)
    return torch.exp(lam)[:, None, None] * state.double() + torch.einsum(
        "kh,khp,khn->hpn", w, x.double(), Bh)


def outputs_triangle(h, x, dt, A, B, C, D=None, z=None):
    """Outputs of new tokens from a materialized state h (replay form): the causal T x T matrix."""
    H, T = x.shape[1], x.shape[0]
    c = torch.cumsum(A.double()[None] * dt, dim=0)                          # (T, H)
    Bh, Ch = heads_of_groups(B.double(), H), heads_of_groups(C.double(), H)
    cb = torch.einsum("thn,jhn->htj", Ch, Bh)                               # (H, T, T)
    decay = torch.exp(c.T[:, :, None] - c.T[:, None, :])                    # exp(c_t - c_j)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    coef = torch.where(causal, decay * cb * dt.T[:, None, :], torch.zeros((), dtype=torch.float64))
    y = torch.exp(c)[:, :, None] * torch.einsum("thn,hpn->thp", Ch, h.double())
    y = y + torch.einsum("htj,jhp->thp", coef, x.double())
    if D is not None:
        y = y + D.double()[None, :, None] * x.double()
    return gate(y, z)


def outputs_rectangle(state, x_hist, dt_hist, B_hist, x, dt, A, B, C, D=None, z=None):
    """No-write outputs without forming h_K: history and new tokens on one key axis of length K + T.

    y_t = exp(Λ + c_t)·(C_t·S) + Σ_k coef[t, k]·x_k, history columns fully visible, new ones causal.
    """
    K, T, H = x_hist.shape[0], x.shape[0], x.shape[1]
    keys_x = torch.cat([x_hist.double(), x.double()])                       # (K+T, H, P)
    keys_dt = torch.cat([dt_hist, dt])                                       # (K+T, H)
    keys_B = heads_of_groups(torch.cat([B_hist.double(), B.double()]), H)   # (K+T, H, N)
    c_all = torch.cumsum(A.double()[None] * keys_dt, dim=0)                 # (K+T, H)
    c_q = c_all[K:]                                                          # Λ + c_t, (T, H)
    Ch = heads_of_groups(C.double(), H)
    cb = torch.einsum("thn,khn->htk", Ch, keys_B)                           # (H, T, K+T)
    decay = torch.exp(c_q.T[:, :, None] - c_all.T[:, None, :])
    visible = torch.arange(K + T)[None, :] <= (K + torch.arange(T))[:, None]
    coef = torch.where(visible, decay * cb * keys_dt.T[:, None, :], torch.zeros((), dtype=torch.float64))
    y = torch.exp(c_q)[:, :, None] * torch.einsum("thn,hpn->thp", Ch, state.double())
    y = y + torch.einsum("htk,khp->thp", coef, keys_x)
    if D is not None:
        y = y + D.double()[None, :, None] * x.double()
    return gate(y, z)
