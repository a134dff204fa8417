"""`specssm drift`: long-horizon drift of rounded / quantized checkpoints under speculative decoding.

Thousands of verify steps with random acceptance (the benchmarks' histogram) drive the float64 reference step
(`checkpointing_ssu_ref`, float64 activations) on an `SSMCache` whose `state` has the studied dtype, so
the only error in the run is the rounding of the checkpoint on flush steps — the same rounding points as
the kernels. After every step the implied state (checkpoint + history) and the outputs of all T tokens
are compared with the sequential float64 recurrence.

Matrix: state dtype (fp32, bf16, fp16, int8, fp8 e4m3fn) x rounding (RN, SR) x checkpoint policy
(W = 16, W = 8, always-write = flush every step). fp32 has RN only: `encode_state` turns SR of an fp32
state into the plain cast, so fp32 SR would repeat fp32 RN.

Inputs: per head A = -exp(U(-1, 1)) and dt = softplus(raw + dt_bias), raw ~ N(0, 0.5^2) per token,
with dt_bias chosen so that the heads' decay rates |A|·softplus(dt_bias) are log-spaced over
[1e-3, 2] per token (dt centres about 4e-4 .. 5): per token A·dt then spans about [-4, -1e-3], the
range real models show (the slow heads are the ones that remember rounding errors). x, B, C ~ N(0, 1);
D = 1 (Mamba init); G = 1.
The run starts from a random prefill state of the stationary magnitude of each head under unit inputs,
stored with RN (its rounding is not counted: the truth starts from the stored value). Controlled
regimes for the bias of RN: --x-scale 0 (no inputs: the state only decays), --x-scale 0.05 (quiet
inputs next to a large state), --coherent 1 (a persistent part of x and B, as real activations have).

Errors are relative per (row, head) — ‖Δ‖ / ‖reference‖ over (P, N) for the state, over (T, P) for the
outputs — and a step's value is their RMS over rows and heads. Also recorded: the rounding error of
each flush alone (stored vs the exact state it rounded), hence the amplification of the run's error
over one rounding; the radial bias <Δ, h> / ‖h‖² (mean over the second half; RN stagnation under
decay shows as a persistent positive sign, SR stays around 0); and the input gain, the part of the
input-driven state (the truth minus the decayed prefill) that the run kept: <h − decayed h0, s> / ‖s‖²
(1: unbiased; below 1: RN swamping, increments below half a grid step dropped).

usage: specssm drift [--steps 2000] [--dtypes fp32,bf16,...] [--roundings rn,sr]
                     [--policies W16,W8,always] [--quick] [--jobs 2] [--out DIR]
writes DIR/results.md (tables), DIR/drift.json (all numbers), DIR/drift.png (state error vs step).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from specssm.bench.mix import DEFAULT_ACCEPTANCE, acceptance_probs
from specssm.cache import SSMCache
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state
from specssm.step.reference import always_write_ssu_ref, checkpointing_ssu_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
          "fp8": torch.float8_e4m3fn}
ROUNDINGS = ("rn", "sr")
POLICIES = {"W16": 16, "W8": 8, "always": 0}     # always = always-write replay (window 0)
QUICK_STEPS = 50


# ------------------------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class Config:
    dtype: str          # key of DTYPES
    rounding: str       # "rn" or "sr"
    policy: str         # key of POLICIES

    @property
    def window(self) -> int:
        return POLICIES[self.policy]

    @property
    def name(self) -> str:
        return f"{self.dtype}-{self.rounding}-{self.policy}"


def make_configs(dtypes=tuple(DTYPES), roundings=ROUNDINGS, policies=tuple(POLICIES)) -> list[Config]:
    """The matrix, fp32 with RN only (its SR is the plain cast, see the module docstring)."""
    for name, given, known in (("dtypes", dtypes, DTYPES), ("roundings", roundings, ROUNDINGS),
                               ("policies", policies, POLICIES)):
        bad = [v for v in given if v not in known]
        if bad or not given:
            raise ValueError(f"{name}: expected a non-empty subset of {list(known)}, got {list(given)}")
    return [Config(d, r, p) for d in dtypes for r in roundings for p in policies
            if not (d == "fp32" and r == "sr")]


@dataclass(frozen=True)
class Setup:
    """Shapes and input distribution of a run (every worker regenerates the same inputs from `seed`)."""
    steps: int = 2000
    rows: int = 2
    H: int = 4
    P: int = 16
    N: int = 32
    T: int = 6
    seed: int = 0
    acceptance: tuple = tuple(sorted(DEFAULT_ACCEPTANCE.items()))
    A: tuple | None = None           # per-head A (< 0); None: -exp(U(-1, 1))
    dt_center: tuple | None = None   # per-head softplus(dt_bias); None: decay_lo..decay_hi / |A|
    decay_lo: float = 1e-3           # |A|·softplus(dt_bias) of the slowest head
    decay_hi: float = 2.0            # ... of the fastest head (log-spaced in between)
    dt_noise: float = 0.5            # std of raw dt around the bias
    x_scale: float = 1.0             # 0: no inputs, the state only decays (controlled bias check)
    coherent: float = 0.0            # persistent part of x and B: x = x_scale·(coherent·sx + noise),
                                     # B = coherent·sB + noise, sx / sB fixed ±1 patterns per row

    def check(self):
        for nm in ("steps", "rows", "H", "P", "N", "T"):
            if getattr(self, nm) < 1:
                raise ValueError(f"{nm}: expected >= 1, got {getattr(self, nm)}")
        for nm in ("A", "dt_center"):
            v = getattr(self, nm)
            if v is not None and len(v) != self.H:
                raise ValueError(f"{nm}: expected {self.H} per-head values, got {len(v)}")
        if self.A is not None and not all(a < 0 for a in self.A):
            raise ValueError(f"A: expected negative values, got {self.A}")
        if self.dt_center is not None and not all(d > 0 for d in self.dt_center):
            raise ValueError(f"dt_center: expected positive values, got {self.dt_center}")
        if not 0 < self.decay_lo <= self.decay_hi:
            raise ValueError(f"decay_lo, decay_hi: expected 0 < decay_lo <= decay_hi, got "
                             f"{self.decay_lo}, {self.decay_hi}")
        if self.dt_noise < 0 or self.x_scale < 0 or self.coherent < 0:
            raise ValueError(f"dt_noise, x_scale, coherent: expected >= 0, got {self.dt_noise}, {self.x_scale}, "
                             f"{self.coherent}")


def head_params(setup: Setup):
    """(A, D, dt_bias) per head, float64 (H,)."""
    gen = torch.Generator().manual_seed(setup.seed)
    f64 = torch.float64
    A = (torch.tensor(setup.A, dtype=f64) if setup.A is not None
         else -torch.exp(torch.empty(setup.H, dtype=f64).uniform_(-1.0, 1.0, generator=gen)))
    if setup.dt_center is not None:
        dt_c = torch.tensor(setup.dt_center, dtype=f64)
    else:
        lo, hi = math.log10(setup.decay_lo), math.log10(setup.decay_hi)
        decay = (torch.tensor([10 ** ((lo + hi) / 2)], dtype=f64) if setup.H == 1
                 else torch.logspace(lo, hi, setup.H, dtype=f64))
        dt_c = decay / A.abs()
    dt_bias = torch.log(torch.expm1(dt_c))              # softplus(dt_bias) = dt_c
    return A, torch.ones(setup.H, dtype=f64), dt_bias, dt_c


def prefill_state(setup: Setup, A, dt_c):
    """Random state (rows, H, P, N) of the stationary magnitude of each head under unit inputs:
    var = dt^2 / (1 - exp(-2 |A| dt)) per element."""
    gen = torch.Generator().manual_seed(setup.seed + 1)
    std = dt_c / torch.sqrt(-torch.expm1(2.0 * A * dt_c))
    h = torch.randn(setup.rows, setup.H, setup.P, setup.N, dtype=torch.float64, generator=gen)
    return h * std[None, :, None, None]


class InputStream:
    """The steps' inputs: x (rows, T, H, P), B / C (rows, T, 1, N), raw dt (rows, T, H), accepted (rows,)."""

    def __init__(self, setup: Setup):
        self.s = setup
        self.gen = torch.Generator().manual_seed(setup.seed + 2)
        p = acceptance_probs(dict(setup.acceptance), setup.T)
        self.p_acc = torch.tensor(p[1:], dtype=torch.float64)
        # fixed sign patterns of the persistent input part (own generator: the noise stream is the same
        # with and without it)
        g = torch.Generator().manual_seed(setup.seed + 3)
        s = setup
        self.sx = torch.randn(s.rows, 1, s.H, s.P, dtype=torch.float64, generator=g).sign() * s.coherent
        self.sB = torch.randn(s.rows, 1, 1, s.N, dtype=torch.float64, generator=g).sign() * s.coherent

    def next(self):
        s, g, f64 = self.s, self.gen, torch.float64
        x = (torch.randn(s.rows, s.T, s.H, s.P, dtype=f64, generator=g) + self.sx) * s.x_scale
        B = torch.randn(s.rows, s.T, 1, s.N, dtype=f64, generator=g) + self.sB
        C = torch.randn(s.rows, s.T, 1, s.N, dtype=f64, generator=g)
        dt_raw = torch.randn(s.rows, s.T, s.H, dtype=f64, generator=g) * s.dt_noise
        acc = torch.multinomial(self.p_acc, s.rows, replacement=True, generator=g).to(torch.int32) + 1
        return x, B, C, dt_raw, acc


# ------------------------------------------------------------------------------------------ the run

def _rel(err, ref, dims):
    """‖err‖ / ‖ref‖ over `dims` (0 where the reference is exactly 0)."""
    num = err.pow(2).sum(dims).sqrt()
    den = ref.pow(2).sum(dims).sqrt()
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num))


class _ConfigRun:
    """One configuration: its cache, the per-step errors, and the state it implied one step ago."""

    def __init__(self, cfg: Config, setup: Setup, A, h0):
        s = setup
        strategy = "always_write" if cfg.window == 0 else "checkpointing"
        self.cfg, self.s = cfg, s
        self.cache = SSMCache(1, s.rows, s.H, s.P, s.N, 1, s.T, cfg.window, state_dtype=DTYPES[cfg.dtype],
                              act_dtype=torch.float64, strategy=strategy, base_seed=s.seed)
        self.slots = self.cache.allocate(s.rows)
        self.cache.write_state(0, self.slots, h0)
        # the truth of this configuration starts from its stored prefill (the prefill rounding is not
        # part of the drift): truth = shared run from 0 + (decay so far) * h0_stored, the recurrence
        # being linear in the state
        self.h0 = torch.stack([self.cache.implied_state(0, int(sl), A) for sl in self.slots])
        self.implied = self.h0.clone()
        self.op = always_write_ssu_ref if cfg.window == 0 else checkpointing_ssu_ref
        shp = (s.steps, s.rows, s.H)
        self.state_err, self.out_err, self.radial = torch.zeros(shp), torch.zeros(shp), torch.zeros(shp)
        self.gain = torch.full(shp, float("nan"))
        self.flush_err = []              # (H,) rounding errors of single flushes
        self.flushes = 0
        self.seconds = 0.0

    def step(self, i, x, B, C, dt_raw, A, D, dt_bias, y_shared, c, loglam):
        t0 = time.perf_counter()
        s, lc = self.s, self.cache.layers[0]
        wrote = (self.cache.pnat + s.T > self.cache.W).tolist()
        out = torch.full_like(x, float("nan"))
        self.op(x=x, dt=dt_raw, A=A, B=B, C=C, out=out, D=D, dt_bias=dt_bias, dt_softplus=True,
                state_batch_indices=self.slots, rand_seed=self.cache.seeds, rounding=self.cfg.rounding,
                **self.cache.op_kwargs(0))
        if torch.isnan(out).any():
            raise AssertionError(f"{self.cfg.name} step {i}: the step left outputs unwritten")
        for r, sl in enumerate(self.slots.tolist()):
            # reference outputs from this configuration's truth: shared part + exp(c_t)·C_t·(decay·h0)
            h0_now = torch.exp(loglam[r])[:, None, None] * self.h0[r]
            y_ref = y_shared[r] + torch.exp(c[r])[:, :, None] * torch.einsum("tn,hpn->thp", C[r, :, 0], h0_now)
            self.out_err[i, r] = _rel(out[r] - y_ref, y_ref, (0, 2)).float()
            if wrote[r]:
                self.flushes += 1
                stored = decode_state(lc.state[sl], None if lc.state_scale is None else lc.state_scale[sl])
                self.flush_err.append(_rel(stored - self.implied[r], self.implied[r], (1, 2)).float())
        self.seconds += time.perf_counter() - t0

    def commit_and_measure(self, i, acc, A, truth, loglam):
        t0 = time.perf_counter()
        self.cache.commit(self.slots, acc)
        for r, sl in enumerate(self.slots.tolist()):
            h_true = truth[r] + torch.exp(loglam[r])[:, None, None] * self.h0[r]
            h = self.cache.implied_state(0, sl, A)
            e = h - h_true
            self.state_err[i, r] = _rel(e, h_true, (1, 2)).float()
            den = h_true.pow(2).sum((1, 2))
            self.radial[i, r] = torch.where(den > 0, (e * h_true).sum((1, 2)) / torch.where(den > 0, den, 1.0),
                                            torch.zeros_like(den)).float()
            # input gain: the truth run from a zero state is the input-driven part of the state
            sig, kept = truth[r], h - torch.exp(loglam[r])[:, None, None] * self.h0[r]
            ss = sig.pow(2).sum((1, 2))
            self.gain[i, r] = torch.where(ss > 0, (kept * sig).sum((1, 2)) / torch.where(ss > 0, ss, 1.0),
                                          float("nan")).float()
            self.implied[r] = h
        self.seconds += time.perf_counter() - t0

    def result(self, tokens_per_row: float) -> dict:
        s = self.s
        st = self.state_err.pow(2).mean((1, 2)).sqrt()            # per step, RMS over rows and heads
        ot = self.out_err.pow(2).mean((1, 2)).sqrt()
        fe = torch.stack(self.flush_err) if self.flush_err else torch.zeros(1, s.H)
        q = max(s.steps // 4, 1)
        growth = (float(st[-q:].pow(2).mean().sqrt() / st[q:2 * q].pow(2).mean().sqrt())
                  if s.steps >= 8 and float(st[q:2 * q].abs().max()) > 0 else float("nan"))
        state_rms = float(st.pow(2).mean().sqrt())
        flush_rms = float(fe.pow(2).mean().sqrt())
        half = s.steps // 2
        head_gain_all = self.gain[half:].nanmean((0, 1)).tolist()
        head_gain = [g for g in head_gain_all if not math.isnan(g)]
        summary = dict(
            state_rms=state_rms, state_max=float(st.max()), state_end=float(st[-1]),
            state_max_single=float(self.state_err.max()),
            out_rms=float(ot.pow(2).mean().sqrt()), out_max=float(ot.max()), out_end=float(ot[-1]),
            flush_err_rms=flush_rms,
            amplification=state_rms / flush_rms if flush_rms > 0 else float("nan"),
            radial_bias=float(self.radial[half:].mean()),
            radial_bias_end=float(self.radial[-1].mean()),
            input_gain_min_head=min(head_gain) if head_gain else float("nan"),
            growth=growth,
            write_fraction=self.flushes / (s.steps * s.rows),
            tokens_per_flush=tokens_per_row * s.rows / max(self.flushes, 1),
            seconds=self.seconds,
        )
        per_head = dict(
            state_rms=self.state_err.pow(2).mean((0, 1)).sqrt().tolist(),
            state_end=self.state_err[-1].pow(2).mean(0).sqrt().tolist(),
            out_rms=self.out_err.pow(2).mean((0, 1)).sqrt().tolist(),
            flush_err_rms=fe.pow(2).mean(0).sqrt().tolist(),
            radial_bias=self.radial[half:].mean((0, 1)).tolist(),
            input_gain=head_gain_all,
        )
        return dict(config=asdict(self.cfg), name=self.cfg.name, window=self.cfg.window, summary=summary,
                    per_head=per_head, series=dict(state=st.tolist(), out=ot.tolist()))


def run_group(setup: Setup, cfgs: list[Config], tag: str = "", progress=True) -> dict:
    """Run configurations in lockstep on one input stream (the float64 truth is computed once).
    Returns {"configs": [result per config], "heads": per-head facts, "seconds": wall time}."""
    setup.check()
    t_start = time.perf_counter()
    s = setup
    A, D, dt_bias, dt_c = head_params(s)
    h0 = prefill_state(s, A, dt_c)
    runs = [_ConfigRun(cfg, s, A, h0) for cfg in cfgs]
    stream = InputStream(s)
    truth = torch.zeros(s.rows, s.H, s.P, s.N, dtype=torch.float64)   # the run from a zero state
    loglam = torch.zeros(s.rows, s.H, dtype=torch.float64)           # Σ A·dt over accepted tokens
    tokens = 0
    every = max(s.steps // 10, 1)
    for i in range(s.steps):
        x, B, C, dt_raw, acc = stream.next()
        dt = rec.process_dt(dt_raw, dt_bias, True)                        # (rows, T, H)
        c = torch.cumsum(A[None, None] * dt, dim=1)                      # (rows, T, H)
        y_shared = [rec.outputs_triangle(truth[r], x[r], dt[r], A, B[r], C[r], D) for r in range(s.rows)]
        for run in runs:
            run.step(i, x, B, C, dt_raw, A, D, dt_bias, y_shared, c, loglam)
        for r in range(s.rows):
            a = int(acc[r])
            _, truth[r] = rec.sequential(truth[r], x[r, :a], dt[r, :a], A, B[r, :a], C[r, :a])
            loglam[r] += (A[None] * dt[r, :a]).sum(0)
            tokens += a
        for run in runs:
            run.commit_and_measure(i, acc, A, truth, loglam)
        if progress and ((i + 1) % every == 0 or i + 1 == s.steps):
            el = time.perf_counter() - t_start
            print(f"drift{tag}: step {i + 1}/{s.steps} ({len(cfgs)} configs) {el:.1f} s, "
                  f"ETA {el / (i + 1) * (s.steps - i - 1):.0f} s", file=sys.stderr, flush=True)
    tokens_per_row = tokens / s.rows
    heads = dict(A=A.tolist(), dt_center=dt_c.tolist(),
                 decay_per_token=(-loglam.sum(0) / tokens).tolist() if tokens else [0.0] * s.H)
    return dict(configs=[run.result(tokens_per_row) for run in runs], heads=heads,
                tokens_per_row=tokens_per_row, seconds=time.perf_counter() - t_start)


def _worker(setup: Setup, cfgs: list[Config], tag: str) -> dict:
    torch.set_num_threads(1)
    return run_group(setup, cfgs, tag)


def run_matrix(setup: Setup, cfgs: list[Config], jobs: int = 1, progress=True) -> dict:
    """All configurations, spread over `jobs` processes (each regenerates the same inputs)."""
    t0 = time.perf_counter()
    jobs = max(1, min(jobs, len(cfgs)))
    # always-write flushes every step (the most stores and SR draws): deal the costly ones out first
    cost = {0: 3, 8: 2, 16: 1}
    order = sorted(cfgs, key=lambda c: -cost.get(c.window, 1))
    groups = [order[j::jobs] for j in range(jobs)]
    if jobs == 1:
        parts = [run_group(setup, groups[0], "", progress)]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_worker, setup, g, f"[{j}]") for j, g in enumerate(groups)]
            parts = [f.result() for f in futs]
    by_name = {r["name"]: r for p in parts for r in p["configs"]}
    return dict(setup=asdict(setup), heads=parts[0]["heads"], tokens_per_row=parts[0]["tokens_per_row"],
                configs=[by_name[c.name] for c in cfgs], jobs=jobs,
                worker_seconds=[p["seconds"] for p in parts], seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------- reporting

def _fmt(v, digits=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}e}"


def markdown(res: dict) -> str:
    s = res["setup"]
    heads = res["heads"]
    lines = [
        "# Drift of rounded / quantized SSM checkpoints (`specssm drift`)",
        "",
        f"{s['steps']} verify steps, {s['rows']} rows, H={s['H']}, P={s['P']}, N={s['N']}, G=1, T={s['T']}, "
        f"the benchmarks' acceptance histogram (mean {res['tokens_per_row'] / s['steps']:.2f} accepted tokens per "
        f"step), seed {s['seed']}; x scale {s['x_scale']}, persistent input part {s['coherent']}, raw-dt noise "
        f"{s['dt_noise']}, head decay rates "
        f"log-spaced over [{s['decay_lo']:g}, {s['decay_hi']:g}] per token. "
        "float64 activations and arithmetic (reference step); only the stored "
        "checkpoint is rounded. CPU run, "
        f"{res['seconds']:.0f} s wall on {res['jobs']} process(es).",
        "",
        "Heads (A, dt centre = softplus(dt_bias), mean |A·dt| per accepted token):",
        "",
        "| head | A | dt centre | mean \\|A·dt\\| |",
        "|---|---|---|---|",
    ]
    for h, (a, d, lam) in enumerate(zip(heads["A"], heads["dt_center"], heads["decay_per_token"])):
        lines.append(f"| {h} | {a:.3f} | {d:.2e} | {lam:.2e} |")
    lines += [
        "",
        "Relative error per (row, head), RMS over rows and heads per step; then RMS over the run, the "
        "largest step, the last step. *flush* = relative error of one rounding of a flush alone; "
        "*ampl.* = state RMS / flush RMS (how much the run accumulates over one rounding); *growth* = "
        "RMS of the last quarter / RMS of the second quarter (≈1: saturated, >1: still growing); "
        "*radial* = mean ⟨Δ, h⟩/‖h‖² over the second half (persistent sign: biased); *gain* = the "
        "smallest over heads of the kept fraction of the input-driven state (1: unbiased, < 1: inputs "
        "dropped by RN swamping; – without inputs).",
        "",
        "| dtype | rnd | policy | writes/step | state RMS | state max | state end | growth | out RMS | "
        "out max | out end | flush | ampl. | radial | gain | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["configs"]:
        c, m = r["config"], r["summary"]
        lines.append(
            f"| {c['dtype']} | {c['rounding'].upper()} | {c['policy']} | {m['write_fraction']:.2f} | "
            f"{_fmt(m['state_rms'])} | {_fmt(m['state_max'])} | {_fmt(m['state_end'])} | {m['growth']:.2f} | "
            f"{_fmt(m['out_rms'])} | {_fmt(m['out_max'])} | {_fmt(m['out_end'])} | {_fmt(m['flush_err_rms'])} | "
            f"{m['amplification']:.1f} | {m['radial_bias']:+.1e} | "
            f"{'–' if math.isnan(m['input_gain_min_head']) else format(m['input_gain_min_head'], '.4f')} | "
            f"{m['seconds']:.0f} |")
    lams = heads["decay_per_token"]
    lines += [
        "",
        "Per head: state relative error, RMS over the run (columns: mean |A·dt| per token of the head).",
        "",
        "| dtype | rnd | policy | " + " | ".join(f"h{h} ({lam:.0e})" for h, lam in enumerate(lams)) + " |",
        "|---|---|---|" + "---|" * len(lams),
    ]
    for r in res["configs"]:
        c = r["config"]
        lines.append(f"| {c['dtype']} | {c['rounding'].upper()} | {c['policy']} | "
                     + " | ".join(_fmt(v) for v in r["per_head"]["state_rms"]) + " |")
    lines += [
        "",
        "Bounded-drift model: per-head state RMS divided by e_h / sqrt(1 − exp(−2·λ_h·F)), with e_h the "
        "head's rounding error of one flush, λ_h its decay per token and F the accepted tokens per flush "
        "(independent unbiased flush errors, each forgotten at rate λ_h). ≈ 1 where the model holds; below 1 "
        "for fast heads, whose error also decays inside the history before it is measured.",
        "",
        "| dtype | rnd | policy | F | " + " | ".join(f"h{h}" for h in range(len(lams))) + " |",
        "|---|---|---|---|" + "---|" * len(lams),
    ]
    for r in res["configs"]:
        c, F = r["config"], r["summary"]["tokens_per_flush"]
        cells = []
        for obs, e, lam in zip(r["per_head"]["state_rms"], r["per_head"]["flush_err_rms"], lams):
            model = e / math.sqrt(-math.expm1(-2.0 * lam * F)) if e > 0 and lam > 0 else 0.0
            cells.append(f"{obs / model:.2f}" if model > 0 else "–")
        lines.append(f"| {c['dtype']} | {c['rounding'].upper()} | {c['policy']} | {F:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> Path | None:
    """drift.png: relative state error vs step (moving RMS over 20 steps), one panel per policy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("drift: matplotlib missing, no plot", file=sys.stderr)
        return None
    policies = [p for p in POLICIES if any(r["config"]["policy"] == p for r in res["configs"])]
    colors = dict(fp32="black", bf16="tab:blue", fp16="tab:green", int8="tab:red", fp8="tab:orange")
    fig, axes = plt.subplots(1, len(policies), figsize=(5.2 * len(policies), 4.4), sharey=True, squeeze=False)
    win, lows = 20, []
    for ax, pol in zip(axes[0], policies):
        for r in res["configs"]:
            c = r["config"]
            if c["policy"] != pol:
                continue
            v = torch.tensor(r["series"]["state"], dtype=torch.float64).pow(2)
            # trailing moving RMS (the window grows over the first steps)
            cs = torch.cat([v.new_zeros(1), torch.cumsum(v, 0)])
            idx = torch.arange(1, len(v) + 1)
            lo = (idx - win).clamp(min=0)
            smooth = ((cs[idx] - cs[lo]) / (idx - lo)).sqrt()
            smooth = torch.where(smooth > 0, smooth, float("nan"))
            # the y range starts below the settled lines, not at the first flush's tiny values
            settled = smooth[len(v) // 10:]
            settled = settled[~torch.isnan(settled)]
            if settled.numel():
                lows.append(float(settled.min()))
            ax.plot(idx.tolist(), smooth.tolist(), color=colors.get(c["dtype"], "gray"),
                    linestyle="-" if c["rounding"] == "rn" else "--", linewidth=1.2,
                    label=f"{c['dtype']} {c['rounding'].upper()}")
        ax.set_yscale("log")
        ax.set_title(f"{pol} ({'flush every step' if POLICIES[pol] == 0 else 'window ' + str(POLICIES[pol])})")
        ax.set_xlabel("verify step")
        ax.grid(True, which="both", alpha=0.3)
    if lows:
        axes[0][0].set_ylim(bottom=0.3 * min(lows))
    axes[0][0].set_ylabel("relative error of the implied state")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    s = res["setup"]
    fig.suptitle(f"drift of the implied state vs float64: T={s['T']}, H={s['H']}, P={s['P']}, N={s['N']}, "
                 f"{s['rows']} rows; RMS over rows and heads, moving RMS of {win} steps (solid RN, dashed SR)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _compact(o):
    """Floats to 4 significant digits so the JSON stays small."""
    if isinstance(o, float):
        return o if math.isnan(o) or math.isinf(o) else float(f"{o:.4g}")
    if isinstance(o, dict):
        return {k: _compact(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_compact(v) for v in o]
    return o


def write_outputs(res: dict, out_dir, make_plot=True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "results.md", out / "drift.json"
    md.write_text(markdown(res))
    meta = dict(res, platform=platform.platform(), python=platform.python_version(), torch=torch.__version__)
    text = json.dumps(_compact(meta), indent=1, allow_nan=True)
    # one line per list of numbers (the per-step series): readable and ~3x smaller
    text = re.sub(r"\[\s*([-+0-9.eE,\sNaInfity]+?)\s*\]",
                  lambda mm: "[" + ", ".join(v.strip() for v in mm.group(1).split(",")) + "]", text)
    js.write_text(text)
    paths = [md, js]
    if make_plot:
        p = plot(res, out / "drift.png")
        if p is not None:
            paths.append(p)
    return paths


# -------------------------------------------------------------------------------------------- CLI

def _csv(v: str) -> list[str]:
    return [t.strip() for t in v.split(",") if t.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specssm drift",
                                 description="long-horizon drift of rounded / quantized SSM checkpoints "
                                             "(float64 reference step, random acceptance)")
    ap.add_argument("--steps", type=int, default=None, help=f"verify steps (default 2000, --quick {QUICK_STEPS})")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps: a smoke run of the whole matrix")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of " + ",".join(DTYPES))
    ap.add_argument("--roundings", default=",".join(ROUNDINGS), help="comma list of rn,sr")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma list of W16 (window 16), W8 (window 8), always (flush every step)")
    ap.add_argument("--rows", type=int, default=2, help="requests (slots) per configuration (default 2)")
    ap.add_argument("--heads", type=int, default=4,
                    help="H; the heads' decay rates |A|·dt are log-spaced over [--decay-lo, --decay-hi]")
    ap.add_argument("--head-dim", type=int, default=16, help="P (default 16)")
    ap.add_argument("--d-state", type=int, default=32, help="N (default 32)")
    ap.add_argument("--T", type=int, default=6, help="tokens per verify step = draft length + 1 (default 6)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs and acceptance draws")
    ap.add_argument("--decay-lo", type=float, default=1e-3, help="decay rate |A|·dt per token, slowest head")
    ap.add_argument("--decay-hi", type=float, default=2.0, help="decay rate |A|·dt per token, fastest head")
    ap.add_argument("--dt-noise", type=float, default=0.5, help="std of raw dt around dt_bias (0: constant dt)")
    ap.add_argument("--x-scale", type=float, default=1.0,
                    help="scale of x (0: no inputs, the state only decays: shows RN stagnation)")
    ap.add_argument("--coherent", type=float, default=0.0,
                    help="persistent part of x and B (fixed ±1 patterns times this; 0: zero-mean inputs)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--out", default="drift_out", help="output folder (results.md, drift.json, drift.png)")
    ap.add_argument("--no-plot", action="store_true", help="write no drift.png (no matplotlib needed)")
    a = ap.parse_args(argv)
    steps = a.steps if a.steps is not None else (QUICK_STEPS if a.quick else 2000)
    try:
        cfgs = make_configs(_csv(a.dtypes), _csv(a.roundings), _csv(a.policies))
        setup = Setup(steps=steps, rows=a.rows, H=a.heads, P=a.head_dim, N=a.d_state, T=a.T, seed=a.seed,
                      decay_lo=a.decay_lo, decay_hi=a.decay_hi, dt_noise=a.dt_noise, x_scale=a.x_scale,
                      coherent=a.coherent)
        setup.check()
    except ValueError as e:
        ap.error(str(e))
    if a.T > 16:
        ap.error(f"--T: expected <= 16 (W = 16 must hold at least one step), got {a.T}")
    print(f"drift: {len(cfgs)} configs x {steps} steps (rows {a.rows}, H {a.heads}, P {a.head_dim}, "
          f"N {a.d_state}, T {a.T}) on {min(a.jobs, len(cfgs))} process(es)", file=sys.stderr, flush=True)
    torch.set_num_threads(1)      # tiny tensors: threads only add overhead (and compete with the workers)
    res = run_matrix(setup, cfgs, jobs=a.jobs)
    paths = write_outputs(res, a.out, make_plot=not a.no_plot)
    print(markdown(res))
    print(f"drift: {res['seconds']:.1f} s; wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
