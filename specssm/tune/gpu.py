"""The tuner's GPU timer: the benchmark's method (benchmarks/README.md, scripts/step_sweep.py) for a list of
candidate configs, interleaved, in one profiler session.

Per target: one SSMCache with enough slot sets that the touched states exceed 4x L2 (state cold), pnat
from the stationary mixed distribution, bf16 activations with z, D, dt_bias and softplus, one StepPlan
per set built outside the timed spans. Per candidate: the step of every set captured in one CUDA graph
between marker kernels, under the candidate's config (tuning.overridden), after one eager run that
compiles it. Per request: `rounds` rounds, each replaying every candidate's graph (the order rotated
by one each round, so no candidate always follows the same one) enough times for `min_steps` steps;
a step's time is its CUPTI span (first kernel start to last kernel end); a candidate's sample for a
round is the median over that round's steps. A candidate that fails to compile or launch gets inf.

Parallel compiles: before a request, the candidates this process has not run yet are run once in
`warm_workers` spawned processes on a one-set copy of the target (same shapes, batch and grid, so the
same Triton specializations); their compiles land in Triton's on-disk cache, which the timing process
then reads instead of compiling one candidate after another.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

import torch

from specssm.bench.mix import DEFAULT_ACCEPTANCE, sample_pnat
from specssm.bench.timing import StepMarkers, capture_graph, profile_device_events, split_steps, step_span
from specssm.cache import SSMCache, StepPlan
from specssm.step import tuning
from specssm.step.launch import checkpointing_ssu
from specssm.tune.space import FAMILIES, Target, override_of


class Env:
    """Caches, slot sets, plans and inputs of one target (sets=None: enough sets for a cold state)."""

    def __init__(self, t: Target, device, sets=None, seed=0):
        sdt = getattr(torch, t.state)
        if sets is None:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            per_set = t.batch * t.H * t.P * t.N * sdt.itemsize
            sets = max(2, min(64, math.ceil(4 * l2 / per_set)))
        self.sets, self.target = sets, t
        gen = torch.Generator().manual_seed(seed)
        n = t.batch * sets
        self.cache = c = SSMCache(1, n, t.H, t.P, t.N, t.G, t.T, t.W, state_dtype=sdt, act_dtype=torch.bfloat16,
                                  device=device)
        lc = c.layers[0]
        if sdt.is_floating_point:
            lc.state.copy_(torch.randn(lc.state.shape, device=device))
        else:
            lc.state.random_(-100, 100)
        if lc.state_scale is not None:
            lc.state_scale.uniform_(0.001, 0.01)
        lc.x_cache.normal_(0, 0.5)
        lc.B_cache.normal_(0, 0.5)
        lc.dt_cache.uniform_(0.001, 0.1)
        c.pnat.copy_(torch.as_tensor(sample_pnat("mixed", n, DEFAULT_ACCEPTANCE, t.T, t.W, seed=seed),
                                     dtype=torch.int32).to(device))
        c.ring_start.copy_(torch.randint(0, c.L, (n,), generator=gen, dtype=torch.int32).to(device))
        c.seeds.copy_(torch.arange(n, device=device) * 7919)
        perm = torch.randperm(n, generator=gen).to(torch.int32).to(device)
        self.sbis = [perm[i * t.batch:(i + 1) * t.batch].contiguous() for i in range(sets)]
        self.plans = [StepPlan(t.batch, device).build(c.pnat, s, t.W, t.T) for s in self.sbis]
        B, T, H, P, N, G = t.batch, t.T, t.H, t.P, t.N, t.G
        x = (torch.randn(B, T, H, P, device=device) * 0.5).to(torch.bfloat16)
        dt = (torch.randn(B, T, H, device=device) * 0.5 - 2).to(torch.bfloat16)
        self.kw = dict(x=x, dt=dt[..., None].expand(B, T, H, P),
                       A=(-torch.rand(H, device=device) - 0.1)[:, None, None].expand(H, P, N),
                       B=(torch.randn(B, T, G, N, device=device) * 0.5).to(torch.bfloat16),
                       C=(torch.randn(B, T, G, N, device=device) * 0.5).to(torch.bfloat16),
                       out=torch.empty_like(x), D=torch.randn(H, device=device)[:, None].expand(H, P),
                       z=torch.randn_like(x), dt_bias=(torch.rand(H, device=device) - 3)[:, None].expand(H, P),
                       dt_softplus=True, **c.op_kwargs(0))
        if t.rounding == "sr":
            self.kw.update(rounding="sr", rand_seed=c.seeds)

    def step(self, cand: dict, i: int):
        fam = FAMILIES[cand["family"]]
        checkpointing_ssu(**self.kw, state_batch_indices=self.sbis[i], plan=self.plans[i], launch=fam.launch,
                          no_write_form=fam.form, validate=False)


def _warm_task(args):
    """Worker: run each candidate once on a one-set copy of the target (compiles into Triton's cache)."""
    target, cands = args
    t = Target(**target)
    global _WORKER_ENV
    if _WORKER_ENV is None or _WORKER_ENV.target != t:
        _WORKER_ENV = None
        torch.cuda.empty_cache()
        _WORKER_ENV = Env(t, torch.device("cuda"), sets=1)
    errors = []
    for c in cands:
        try:
            with tuning.overridden(override_of(c)):
                _WORKER_ENV.step(c, 0)
            torch.cuda.synchronize()
            errors.append("")
        except Exception as e:  # noqa: BLE001 - the timing process reports it again
            errors.append(f"{type(e).__name__}: {e}"[:200])
    return errors


_WORKER_ENV = None


class GpuTimer:
    def __init__(self, min_steps: int = 16, warm_workers: int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(self.device)
        self.device_name, self.num_sms = props.name, props.multi_processor_count
        self.card = tuning.card_name(self.device)
        self.min_steps = min_steps
        self.markers = StepMarkers(self.device)
        self.env = None
        self.warm_workers = (min(8, max(1, (os.cpu_count() or 2) // 2)) if warm_workers is None else warm_workers)
        self._pool, self._seen = None, set()

    def _env_for(self, t: Target) -> Env:
        if self.env is None or self.env.target != t:
            self.env = None
            torch.cuda.empty_cache()
            self.env = Env(t, self.device)
        return self.env

    def _key(self, t: Target, cand: dict) -> str:
        return json.dumps([t.as_dict(), cand], sort_keys=True)

    def _warm(self, t: Target, cands: list) -> dict:
        """Compile the candidates this process has not run yet in the worker processes; returns
        {key: error} of those that failed there (the timing process does not launch them: a fault
        would poison its CUDA context for every later measurement)."""
        new = [c for c in cands if self._key(t, c) not in self._seen]
        if self.warm_workers < 2 or len(new) < 2:
            return {}
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor
            self._pool = ProcessPoolExecutor(self.warm_workers, mp_context=multiprocessing.get_context("spawn"))
        parts = [new[i::self.warm_workers] for i in range(self.warm_workers)]
        parts = [p for p in parts if p]
        try:
            errors = list(self._pool.map(_warm_task, [(t.as_dict(), p) for p in parts]))
        except Exception as e:  # noqa: BLE001 - warming only saves time; timing compiles what it must
            print(f"specssm tune: parallel compile failed ({type(e).__name__}: {e}); compiling in order",
                  file=sys.stderr)
            self.warm_workers = 0
            return {}
        return {self._key(t, c): err for part, errs in zip(parts, errors) for c, err in zip(part, errs) if err}

    def _capture(self, env: Env, cand: dict):
        m = self.markers

        def body():
            for i in range(env.sets):
                m.begin()
                env.step(cand, i)
                m.end()
        with tuning.overridden(override_of(cand)):
            env.step(cand, 0)             # compiles, allocates the plans' scratch outside the capture
            torch.cuda.synchronize()
            graph = capture_graph(body)
        self._seen.add(self._key(env.target, cand))
        return graph

    def time(self, t: Target, candidates: list, rounds: int, request=None) -> list:
        env = self._env_for(t)
        failed = self._warm(t, candidates)
        graphs = []
        for c in candidates:
            if self._key(t, c) in failed:
                print(f"specssm tune: {json.dumps(c)} failed in a compile worker: {failed[self._key(t, c)]}",
                      file=sys.stderr)
                graphs.append(None)
                continue
            try:
                graphs.append(self._capture(env, c))
            except Exception as e:         # a candidate that does not compile is timed as inf
                if "CUDA error" in str(e) or "illegal" in str(e):
                    raise        # the context is gone: every later measurement would be wrong
                print(f"specssm tune: {json.dumps(c)} failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                graphs.append(None)
        replays = max(1, -(-self.min_steps // env.sets))
        orders = [[(i + r) % len(candidates) for i in range(len(candidates))] for r in range(rounds)]

        def run():
            for order in orders:
                for i in order:
                    if graphs[i] is not None:
                        for _ in range(replays):
                            graphs[i].replay()
        for g in graphs:           # one untimed replay each: the first replay of a graph uploads it
            if g is not None:
                g.replay()
        torch.cuda.synchronize()
        steps = split_steps(profile_device_events(run))
        per = replays * env.sets
        expected = per * sum(g is not None for g in graphs) * rounds
        if len(steps) != expected:
            raise RuntimeError(f"trace: expected {expected} marked steps, got {len(steps)} (lost device activity?)")
        samples = [[math.inf] * rounds for _ in candidates]
        k = 0
        for r, order in enumerate(orders):
            for i in order:
                if graphs[i] is not None:
                    samples[i][r] = float(statistics.median(step_span(s) for s in steps[k:k + per]))
                    k += per
        graphs.clear()          # free the graphs (and their memory pools) before the next request
        torch.cuda.synchronize()
        return samples

    def check(self, t: Target, cand: dict, reference: dict) -> dict:
        return compare(self._env_for(t), cand, reference)


def compare(env: Env, cand: dict, reference: dict) -> dict:
    """Run set 0's step under each config from the same caches (restored after each) and compare the
    outputs and the states (decoded): {"ok", "detail"}. Tilings may reorder sums, so the bound is 2% of
    the reference's largest magnitude: loose for rounding, tight for a wrong tile."""
    lc = env.cache.layers[0]
    slots = env.sbis[0].long()
    tensors = [lc.state, lc.x_cache, lc.B_cache, lc.dt_cache] + ([lc.state_scale] if lc.state_scale is not None else [])
    saved = [x[slots].clone() for x in tensors]
    got = []
    for cfg in (cand, reference):
        for x, s in zip(tensors, saved):
            x[slots] = s
        with tuning.overridden(override_of(cfg)):
            env.step(cfg, 0)
        state = lc.state[slots].float()
        if lc.state_scale is not None:
            state = state * lc.state_scale[slots][..., None]
        got.append((env.kw["out"].float().clone(), state))
    for x, s in zip(tensors, saved):
        x[slots] = s
    for name, a, b in (("out", got[0][0], got[1][0]), ("state", got[0][1], got[1][1])):
        if torch.isnan(a).sum() > torch.isnan(b).sum():
            return {"ok": False, "detail": f"{name}: NaN where DEFAULT has none"}
        ok = torch.isfinite(b)
        err = float((a[ok] - b[ok]).abs().max()) if ok.any() else 0.0
        scale = float(b[ok].abs().max()) if ok.any() else 1.0
        if err > 2e-2 * scale + 1e-6:
            return {"ok": False, "detail": f"{name}: max |diff| {err:.3g} against max |DEFAULT| {scale:.3g}"}
    return {"ok": True, "detail": ""}
