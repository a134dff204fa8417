"""`specssm bench --compiled`: one decode step of the tiny Mamba2 LM, eager against torch.compile (issue 18).

The step is `TinyMamba2LM.step_unchecked` (no host checks, no commit) of models built with validate=False,
in four variants on the same weights, inputs and cache contents: eager (op by op), eager captured in a CUDA
graph (`timing.capture_graph`), `compile_step("inductor")` launched from Python, and
`compile_step("inductor", mode="reduce-overhead")` (compiled and replayed from CUDA graphs). Per (state
dtype, batch), a cache warmed by eager steps with commits is copied to each variant, which runs a few
committed steps beside eager (compared: `vs eager`); then its step is timed uncommitted, the same work in
every sample: CUDA events around one step, synchronized after it, median of --repeats (`timing.time_events`).
benchmarks/README.md has the details. `--device cpu` is a smoke mode for tests (the Triton interpreter, the
tiny model, eager and torch.compile(aot_eager), two steps checked and two timed by wall clock).
"""
from __future__ import annotations

import datetime
import functools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from specssm.bench import cases as cs
from specssm.bench import mix
from specssm.bench.timing import no_cuda

VARIANTS = ("eager", "eager_graph", "compiled", "reduce_overhead")
LABELS = {"eager": "eager", "eager_graph": "eager, CUDA graph", "compiled": "torch.compile({backend})",
          "reduce_overhead": "torch.compile(reduce-overhead)"}
TIMERS = {"eager": "events, launched", "eager_graph": "events, graph replay", "compiled": "events, launched",
          "reduce_overhead": "events, launched (graph replays)"}
MODES = {   # what an unset option means on each device
    "cuda": dict(size="large", batches=[1, 8, 64], dtypes=["fp32", "bf16"], repeats=50, warm=8, check=4,
                 backend="inductor", variants=VARIANTS),
    "cpu": dict(size="tiny", batches=[2], dtypes=["fp32"], repeats=2, warm=1, check=2, backend="aot_eager",
                variants=("eager", "compiled")),
}


def options(args) -> dict:
    """The run's settings from `specssm bench --compiled` arguments; ValueError naming a bad argument."""
    device = args.device or "cuda"
    o = dict(MODES[device], device=device, T=args.T, W=args.W, act=args.act_dtype, seed=args.seed,
             precision=args.precision)
    for key, value in (("size", args.size), ("batches", args.batches), ("dtypes", args.dtypes),
                       ("repeats", args.repeats), ("backend", args.compile_backend)):
        if value is not None:
            o[key] = value
    for ok, message in [
            (o["batches"] and min(o["batches"]) >= 1, f"--batches: expected positive batch sizes, got {o['batches']}"),
            (o["dtypes"] and set(o["dtypes"]) <= set(cs.STATE_DTYPES),
             f"--dtypes: expected state dtypes from {list(cs.STATE_DTYPES)}, got {o['dtypes']}"),
            (o["repeats"] >= 1, f"--repeats: expected >= 1, got {o['repeats']}"),
            (o["T"] >= 1, f"--T: expected >= 1, got {o['T']}"),
            (0 <= o["W"] <= 16, f"--W: expected 0 <= W <= 16, got {o['W']}")]:
        if not ok:
            raise ValueError(message)
    o["hist"] = mix.load_histogram_csv(args.histogram) if args.histogram else dict(mix.DEFAULT_ACCEPTANCE)
    mix.acceptance_probs(o["hist"], o["T"])
    o["labels"] = {v: LABELS[v].format(backend=o["backend"]) for v in o["variants"]}
    return o


def build_models(o) -> dict:
    """The variants' models, same seed: eager (also the graphed variant's) and one per compile."""
    from specssm.bench.runner import torch_dtype
    from specssm.model import SIZES, TinyMamba2LM

    def make():
        return TinyMamba2LM(SIZES[o["size"]], seed=o["seed"], dtype=torch_dtype(o["act"]), device=o["device"],
                            ssu="op", conv="triton", precision=o["precision"], validate=False)
    eager = make()
    models = {"eager": eager, "eager_graph": eager}
    if "compiled" in o["variants"]:
        models["compiled"] = make().compile_step(o["backend"])
    if "reduce_overhead" in o["variants"]:
        models["reduce_overhead"] = make().compile_step("inductor", mode="reduce-overhead")
    return models


def _bits(t):
    """A tensor's bits as integers (NaNs compare equal to themselves; fp8 has no arithmetic)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _rel_err(got, want) -> float:
    """max |got - want| / max |want| (NaNs as 0), in float64."""
    g, w = (x.double().nan_to_num(0.0, 0.0, 0.0) for x in (got, want))
    return float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) if w.numel() else 0.0


def compare(check: dict, logits, want_logits, cache, want_cache) -> None:
    """Fold one step's logits and cache against the reference's into `check` (bitwise, max relative
    errors of the logits and of the cache's data (states, scales, rings, conv states), its int32 / int64
    bookkeeping (pnat, ring_start, seeds, conv offsets) equal)."""
    same = torch.equal(_bits(logits), _bits(want_logits))
    check["logits_rel_err"] = max(check["logits_rel_err"], 0.0 if same else _rel_err(logits, want_logits))
    for a, b in zip(cache.tensors(), want_cache.tensors()):
        equal = torch.equal(_bits(a), _bits(b))
        same &= equal
        if not equal and a.dtype in (torch.int32, torch.int64):
            check["ints_equal"] = False
        elif not equal:
            check["cache_rel_err"] = max(check["cache_rel_err"], _rel_err(a, b))
    check["bitwise"] &= same


def time_wall(fn, calls: int):
    """The CPU smoke mode's timer: wall clock around each call (the interpreter runs synchronously)."""
    from specssm.bench.timing import StepStats
    t = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e6)
    t = np.array(t)
    return StepStats(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                     float(t.mean()), float("nan"), int(t.size), 0)


def _graphed(model, cache, slots, tokens):
    """The eager step captured in a CUDA graph on `cache`; the capture's warm-up step is undone, so the cache
    stays in step with eager's. Returns (tokens -> logits through the graph, the replay alone)."""
    from specssm.bench.timing import capture_graph
    tok, out, saved = tokens.clone(), {}, [t.clone() for t in cache.tensors()]
    graph = capture_graph(lambda: out.update(logits=model.step_unchecked(tok, cache, slots)))
    for t, s in zip(cache.tensors(), saved):
        t.copy_(s)
    return (lambda x: (tok.copy_(x), graph.replay(), out["logits"])[2]), graph.replay


def run_case(models, o, state: str, batch: int, strict: bool = False) -> list[dict]:
    """Warm a cache, check every variant against eager over a few committed steps, time each; one row each."""
    from torch._dynamo.utils import counters

    from specssm.bench.runner import torch_dtype
    from specssm.bench.timing import time_events
    torch._dynamo.reset()               # a compile per case: no recompile limit reached, old graphs freed
    counters.clear()
    eager, T, dev, variants = models["eager"], o["T"], torch.device(o["device"]), o["variants"]
    n = o["warm"] + o["check"]
    gen = torch.Generator().manual_seed(o["seed"])
    tokens = [torch.randint(0, eager.cfg.vocab_size, (batch, T), generator=gen).to(dev) for _ in range(n)]
    acc = torch.as_tensor(mix.sample_accepted(n * batch, o["hist"], T, o["seed"]), device=dev).view(n, batch)
    caches = {v: eager.new_cache(batch, T, o["W"], torch_dtype(state)) for v in ("warm", *variants)}
    slots = caches["warm"].allocate(batch).to(dev)
    for i in range(o["warm"]):
        eager.step_unchecked(tokens[i], caches["warm"], slots)
        caches["warm"].commit(slots, acc[i], T, validate=False)
    for v in variants:
        caches[v].allocate(batch)
        for a, b in zip(caches[v].tensors(), caches["warm"].tensors()):
            a.copy_(b)
    errors, step, checks = {}, {}, {v: dict(bitwise=True, logits_rel_err=0.0, cache_rel_err=0.0, ints_equal=True)
                                    for v in (*variants, "ro_vs_compiled")}

    def attempt(v, fn, *args):
        try:
            return fn(*args)
        except Exception as e:      # a variant's failure goes in its row, not the run's
            if strict or v == "eager":
                raise
            errors[v] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]

    for v in variants:
        # (tokens -> logits, what is timed: None for the launched step, the replay for the graph)
        step[v] = (attempt(v, _graphed, eager, caches[v], slots, tokens[0]) if v == "eager_graph" else
                   (functools.partial(models[v].step_unchecked, cache=caches[v], slots=slots), None))
    for i in range(o["warm"], n):
        outs = {v: attempt(v, lambda f, x: f(x).clone(), step[v][0], tokens[i]) for v in variants if v not in errors}
        live = [v for v in variants if v not in errors]
        for v in live:
            compare(checks[v], outs[v], outs["eager"], caches[v], caches["eager"])
        if {"reduce_overhead", "compiled"} <= set(live):
            compare(checks["ro_vs_compiled"], outs["reduce_overhead"], outs["compiled"], caches["reduce_overhead"],
                    caches["compiled"])
        for v in live:              # the commits run eagerly, outside every graph
            caches[v].commit(slots, acc[i], T, validate=False)
    rows = []
    for v in variants:
        row = dict(variant=v, label=o["labels"][v], state_dtype=state, batch=batch, status="ok", **checks[v],
                   timer=TIMERS[v] if o["device"] == "cuda" else "wall clock",
                   writes=int(caches["eager"].will_write(slots, T).sum()))
        if v == "reduce_overhead" and "compiled" in variants and "compiled" not in errors:
            row["bitwise_vs_compiled"] = checks["ro_vs_compiled"]["bitwise"]
        if v not in errors:         # the graph's replay alone, or the launched step on the last tokens
            fn, host = step[v][1] or functools.partial(step[v][0], tokens[-1]), []
            st = (attempt(v, time_events, fn, 1, o["repeats"], 2, host) if o["device"] == "cuda"
                  else attempt(v, time_wall, fn, o["repeats"]))
        if v not in errors:
            caches[v].ssm.raise_if_faulted()
            row.update(median_us=st.median_us, p10_us=st.p10_us, p90_us=st.p90_us, samples=st.samples,
                       host_us=float(np.median(host)) if host else None)
        else:
            row.update(status="error", error=errors[v])
        rows.append(row)
    for r in rows:
        if r["variant"] == "reduce_overhead" and counters["inductor"]["cudagraph_skips"]:
            r["note"] = "CUDA graphs skipped by inductor: timed as plain inductor"
        if r.get("median_us") and rows[0].get("median_us"):
            r["x_eager"] = rows[0]["median_us"] / r["median_us"]
    return rows


def meta(o, argv) -> dict:
    """The run's card, versions, model and settings (the page's header; compiled.json's "meta")."""
    import triton

    from specssm.model import SIZES
    cuda = o["device"] == "cuda"
    card = torch.cuda.get_device_name() if cuda else f"CPU {platform.machine()} (Triton interpreter)"
    return dict(card=card, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), date=datetime.date.today().isoformat(), size=o["size"],
                model=dict(SIZES[o["size"]].__dict__), **{k: o[k] for k in (
                    "device", "T", "W", "act", "precision", "repeats", "warm", "check", "backend", "dtypes",
                    "batches", "variants", "labels")}, command="specssm bench " + " ".join(argv))


def run(args) -> int:
    """`specssm bench --compiled`: every (state dtype, batch) case; the page on stdout and in --results-md,
    the rows in --out/compiled.json. Exit code 2 on a bad argument or a missing device, 1 if a variant failed."""
    from specssm._runtime import kernels_interpreted
    from specssm.bench.report import compiled_markdown
    try:
        o = options(args)
    except ValueError as e:
        print(f"specssm bench --compiled: {e}", file=sys.stderr)
        return 2
    todo = [(d, b) for d in o["dtypes"] for b in o["batches"]]
    if args.dry_run:
        for d, b in todo:
            print("\n".join(f"compiled {o['size']} {o['labels'][v]} {d} batch={b}" for v in o["variants"]))
        print(f"{len(todo) * len(o['variants'])} cases", file=sys.stderr)
        return 0
    if o["device"] == "cuda" and no_cuda("specssm bench --compiled", "--device cpu runs the smoke mode: tiny "
                                         "model, Triton interpreter; --dry-run lists the cases"):
        return 2
    if o["device"] == "cpu" and not kernels_interpreted():
        print("specssm bench --compiled: --device cpu runs the Triton kernels in the interpreter: set "
              "TRITON_INTERPRET=1 before the start", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if o["device"] == "cpu":
        torch.set_num_threads(1)            # tiny tensors: threads only add overhead
    try:
        models, rows = build_models(o), []
        for d, b in todo:
            t0 = time.perf_counter()
            rows += run_case(models, o, d, b, args.strict)
            print(f"specssm bench --compiled: state {d}, batch {b}: {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    m = meta(o, getattr(args, "argv", []))
    page = compiled_markdown(rows, m)
    sys.stdout.write(page)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compiled.json").write_text(json.dumps({"meta": m, "rows": rows}, indent=1))
    if args.results_md:
        Path(args.results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_md).write_text(page)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"specssm bench --compiled: {len(failed)} variant(s) failed (see the page)", file=sys.stderr)
    return 1 if failed else 0
