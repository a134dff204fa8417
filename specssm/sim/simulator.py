"""Speculative-decoding simulator: many verify steps with random acceptance, slot churn and padding
rows, checked against the sequential recurrence of each request.

It drives any step op with the `checkpointing_ssu` signature (the float64 reference or a Triton
kernel) through an `SSMCache`, and after every step compares (1) the outputs of all tokens of every
row with the token-by-token recurrence from the request's true state and (2) the state implied by
checkpoint + history with the true state after the accepted tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specssm.cache import SSMCache
from specssm.reference import recurrence as rec


@dataclass
class SimReport:
    steps: int = 0
    rows: int = 0
    writes: int = 0
    churned: int = 0
    pad_rows: int = 0
    max_out_err: float = 0.0        # max |out - ref| / max |ref| over a step
    max_state_err: float = 0.0      # same for the implied state
    pnat_hist: dict = field(default_factory=dict)

    def summary(self) -> str:
        wf = self.writes / max(self.rows, 1)
        return (f"{self.steps} steps, {self.rows} rows ({self.pad_rows} padding), write fraction {wf:.2f}, "
                f"{self.churned} slot reuses; max rel error: outputs {self.max_out_err:.2e}, "
                f"implied state {self.max_state_err:.2e}")


def random_params(H, P, N, G, gen, dtype=torch.float64):
    """Per-head A < 0, D, dt_bias as the mamba convention passes them (tied, stride-0 views)."""
    A = -torch.exp(torch.empty(H, dtype=dtype).uniform_(-1.0, 1.0, generator=gen))
    D = torch.randn(H, dtype=dtype, generator=gen)
    dt_bias = torch.empty(H, dtype=dtype).uniform_(-4.0, -1.0, generator=gen)
    return A[:, None, None].expand(H, P, N), D[:, None].expand(H, P), dt_bias[:, None].expand(H, P)


def simulate(ssu, *, steps=200, num_slots=8, batch=6, layers=2, H=4, P=8, N=8, G=2, T=4, window=16,
             p_churn=0.1, p_pad=0.15, use_z=True, seed=0, dtype=torch.float64, strategy="checkpointing",
             device="cpu", check_every=1, tol=None) -> SimReport:
    """Run `steps` verify steps of `ssu` and check them. Raises AssertionError beyond `tol`
    (default 1e-10 relative in float64, 2e-2 otherwise)."""
    tol = tol if tol is not None else (1e-10 if dtype == torch.float64 else 2e-2)
    gen = torch.Generator().manual_seed(seed)
    cache = SSMCache(layers, num_slots, H, P, N, G, T, window, state_dtype=dtype, act_dtype=dtype,
                     device=device, strategy=strategy)
    params = [random_params(H, P, N, G, gen, dtype) for _ in range(layers)]
    truth = {}                                   # slot -> list of float64 states per layer
    rep = SimReport()

    def start(slot):
        hs = [torch.randn(H, P, N, dtype=torch.float64, generator=gen) for _ in range(layers)]
        for li, h in enumerate(hs):
            cache.write_state(li, torch.tensor([slot]), h[None])
        truth[slot] = [cache.implied_state(li, slot, params[li][0]) for li in range(layers)]

    for s in cache.allocate(min(batch, num_slots)).tolist():
        start(s)
    for step in range(steps):
        for s in list(truth):                    # churn: finish requests, start new ones
            if torch.rand((), generator=gen) < p_churn:
                cache.free([s])
                del truth[s]
                s2 = int(cache.allocate(1)[0])
                start(s2)
                rep.churned += 1
        live = list(truth)
        rows = []
        for s in live:
            if torch.rand((), generator=gen) < p_pad:
                rows.append(cache.pad_slot_id)
            rows.append(s)
        sbi = torch.tensor(rows, dtype=torch.int32)
        nb = len(rows)
        x = torch.randn(nb, T, H, P, dtype=dtype, generator=gen)
        z = torch.randn(nb, T, H, P, dtype=dtype, generator=gen) if use_z else None
        Bm = torch.randn(nb, T, G, N, dtype=dtype, generator=gen)
        Cm = torch.randn(nb, T, G, N, dtype=dtype, generator=gen)
        dt_raw = torch.randn(nb, T, H, dtype=dtype, generator=gen)
        pnat_before = cache.pnat.clone()
        for li in range(layers):
            A, D, dt_bias = params[li]
            out = torch.full_like(x, float("nan"))
            ssu(x=x, dt=dt_raw[..., None].expand(nb, T, H, P), A=A, B=Bm, C=Cm, out=out, D=D, z=z,
                dt_bias=dt_bias, dt_softplus=True, state_batch_indices=sbi, pad_slot_id=cache.pad_slot_id,
                **cache.op_kwargs(li))
            for b, s in enumerate(rows):
                if s == cache.pad_slot_id:
                    if not torch.isnan(out[b]).all():
                        raise AssertionError(f"step {step}: padding row {b} had its output written")
                    continue
                dt_b = rec.process_dt(dt_raw[b], dt_bias[:, 0], True)
                y_ref, _ = rec.sequential(truth[s][li], x[b], dt_b, A[:, 0, 0], Bm[b], Cm[b], D[:, 0],
                                          None if z is None else z[b])
                err = float((out[b].double() - y_ref).abs().max() / y_ref.abs().max())
                rep.max_out_err = max(rep.max_out_err, err)
                if not err <= tol:
                    raise AssertionError(f"step {step} layer {li} row {b} slot {s}: output error {err:.3e}")
        acc = torch.randint(1, T + 1, (nb,), generator=gen, dtype=torch.int32)
        for b, s in enumerate(rows):
            if s == cache.pad_slot_id:
                rep.pad_rows += 1
                continue
            rep.rows += 1
            k = int(pnat_before[s])
            rep.pnat_hist[k] = rep.pnat_hist.get(k, 0) + 1
            rep.writes += int(k + T > cache.W) if strategy != "all_states" else 1
            a = int(acc[b])
            for li in range(layers):
                A, D, dt_bias = params[li]
                dt_b = rec.process_dt(dt_raw[b, :a], dt_bias[:, 0], True)
                _, truth[s][li] = rec.sequential(truth[s][li], x[b, :a], dt_b, A[:, 0, 0], Bm[b, :a], Cm[b, :a])
        cache.commit(sbi, acc)
        rep.steps += 1
        if step % check_every == 0:
            for s in live:
                for li in range(layers):
                    h = cache.implied_state(li, s, params[li][0])
                    err = float((h - truth[s][li]).abs().max() / truth[s][li].abs().max())
                    rep.max_state_err = max(rep.max_state_err, err)
                    if not err <= tol:
                        raise AssertionError(f"step {step} layer {li} slot {s}: implied-state error {err:.3e}")
    return rep
