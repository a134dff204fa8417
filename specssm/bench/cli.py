"""`specssm bench`: time the strategies' per-layer step on a GPU against the byte floor (benchmarks/README.md).

Each case (shape, strategy variant, state dtype, rounding, scenario, batch) is captured in a CUDA graph of
several steps on rotating slot sets (state cold, inputs hot), replayed under torch.profiler; the step time
is the CUPTI span from its first kernel start to its last kernel end. Writes results.csv, results.json,
summary.md and PNG plots to --out; --results-md also writes the summary to a path of your choice.

--peer trtllm=PATH also times TensorRT-LLM's Triton checkpointing kernel (the seed) on the same caches,
imported from PATH at run time (only its own kernels are timed); our checkpointing rows gain `× seed`.

The quick loop used while tuning: --timer events times whole graph replays with CUDA events (no
profiler; no seed), --sweep runs each checkpointing variant under each of a list of tuning overrides,
--kernels prints the registers, spills and shared memory of every compiled step kernel at the end:

    specssm bench --timer events --strategies checkpointing --launch dynamic,split --dtypes fp32 \\
        --batches 1,8,64,256,1024 --no-conv --no-plots --sweep '[{}, {"fused": {"num_warps": 8}}]' --kernels

--compiled times one decode step of the tiny Mamba2 LM (specssm.model) eager, eager in a CUDA graph,
torch.compile(inductor) and torch.compile(mode="reduce-overhead") side by side (specssm/bench/compiled.py);
it reads --batches (default 1,8,64), --dtypes (state dtypes, default fp32,bf16), --T, --W, --act-dtype,
--precision, --histogram, --seed, --out, --results-md, --strict and --dry-run, and adds --size, --repeats,
--compile-backend and --device (cpu: a smoke mode in the Triton interpreter, for tests):

    specssm bench --compiled --size large --results-md out/compiled.md

Long runs (--all) can be split: --time-budget stops cleanly, --resume continues from --out/results.json.
--dry-run lists the cases and --render re-renders a results.json; both work without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from specssm.bench import cases as cs
from specssm.bench import mix, report
from specssm.bench import peer as pr
from specssm.model.config import SIZES

EXIT_INCOMPLETE = 3
TIMERS = ("cupti", "events")

QUICK = dict(shapes=["super_tp8"], batches=[1, 16, 256], dtypes=["fp32", "bf16", "int8"], launch=["auto"],
             no_write_form=["rectangle"], scenarios=["mixed"], rounding=["rn"], min_samples=50)
ALL = dict(shapes=["super_tp8", "tp1"], batches=list(cs.BATCHES), dtypes=list(cs.STATE_DTYPES),
           launch=list(cs.LAUNCHES), no_write_form=list(cs.NO_WRITE_FORMS), scenarios=list(mix.SCENARIOS),
           rounding=list(cs.ROUNDINGS))
DEFAULTS = dict(shapes=["super_tp8"], batches=list(cs.BATCHES), dtypes=list(cs.STATE_DTYPES), launch=["auto"],
                no_write_form=["rectangle"], scenarios=["mixed"], rounding=["rn"],
                strategies=list(cs.STRATEGIES), min_samples=200)


def _list(conv=str):
    def parse(text):
        return [conv(v.strip()) for v in text.split(",") if v.strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specssm bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to measure (comma-separated lists; explicit flags override --quick/--all)")
    g.add_argument("--all", action="store_true", help="every shape, launch mode, no-write form, scenario, "
                   "rounding, state dtype and batch 1..1024")
    g.add_argument("--quick", action="store_true", help="a small subset (super_tp8, batch 1,16,256, fp32/bf16/int8)")
    g.add_argument("--shapes", type=_list(), help=f"named {sorted(cs.SHAPES)} or {cs.SHAPE_SYNTAX}, e.g. "
                   "nano:64x64x128x8 (default super_tp8)")
    g.add_argument("--strategies", type=_list(), help=f"from {cs.STRATEGIES} (default all)")
    g.add_argument("--launch", type=_list(), help=f"checkpointing launch modes from {cs.LAUNCHES} (default auto)")
    g.add_argument("--no-write-form", type=_list(), help=f"from {cs.NO_WRITE_FORMS} (default rectangle)")
    g.add_argument("--dtypes", type=_list(), help=f"state dtypes from {cs.STATE_DTYPES} (default all)")
    g.add_argument("--rounding", type=_list(), help="rn, sr or rn,sr (default rn)")
    g.add_argument("--scenarios", type=_list(), help=f"from {mix.SCENARIOS} (default mixed)")
    g.add_argument("--batches", "--batch", type=_list(int), help="batch sizes (default 1,2,4,...,1024)")
    g.add_argument("--materialize", action="store_true", help="time specssm.step.materialize instead of the step: "
                   "fold the rings of --batches source slots (default 1024; pnat drawn as in the mixed scenario) "
                   "into fresh checkpoints of other slots, per --shapes, --dtypes and --rounding; writes "
                   "materialize.json to --out (specssm/bench/materialize.py)")
    c = ap.add_argument_group("--compiled: the model's decode step, eager against torch.compile "
                              "(specssm/bench/compiled.py)")
    c.add_argument("--compiled", action="store_true", help="time one decode step of TinyMamba2LM (validate=False, "
                   "no commit) eager, eager in a CUDA graph, torch.compile(inductor) and torch.compile(mode="
                   "'reduce-overhead'), per --dtypes (default fp32,bf16) and --batches (default 1,8,64); checks "
                   "each against eager over committed steps; a markdown table (variant x batch, µs per step, "
                   "x eager) on stdout and in --results-md, the rows in --out/compiled.json")
    c.add_argument("--size", choices=sorted(SIZES), help="model size (specssm/model/config.py; "
                   "default large, tiny with --device cpu)")
    c.add_argument("--repeats", type=int, help="steps timed per variant and case, the median reported "
                   "(default 50; 2 with --device cpu)")
    c.add_argument("--compile-backend", choices=("inductor", "aot_eager"), help="torch.compile backend of the "
                   "compiled variant (default inductor; aot_eager with --device cpu); reduce-overhead is inductor's")
    c.add_argument("--device", choices=("cuda", "cpu"), help="cuda (default) or cpu: the smoke mode, the Triton "
                   "interpreter (TRITON_INTERPRET=1), tiny model, eager and torch.compile only, 2 steps checked "
                   "and 2 timed (seconds; for tests, not a measurement)")
    g.add_argument("--peer", metavar="trtllm=PATH", help="also time TensorRT-LLM's checkpointing kernel "
                   f"(the seed), imported from PATH: a folder holding {pr.PACKAGE}/ or that folder itself; on "
                   "the checkpointing caches, every scenario and rounding; adds × seed to our rows")
    g.add_argument("-T", "--T", type=int, default=6, help="tokens per verify step (default 6)")
    g.add_argument("--W", type=int, default=16, help="history window of checkpointing (default 16)")
    g.add_argument("--act-dtype", default="bf16", choices=["bf16", "fp16"], help="activation dtype (default bf16)")
    g.add_argument("--z", action="store_true", help="pass the z gate to the step (counted in the floor)")
    g.add_argument("--histogram", help="acceptance histogram CSV, rows 'accepted,count' (default: "
                   "DEFAULT_ACCEPTANCE in specssm/bench/mix.py)")
    g.add_argument("--precision", default="fast", help="precision= of the checkpointing ops (default fast)")
    g.add_argument("--no-conv", dest="conv", action="store_false", help="skip the figure with conv1d")
    g.add_argument("--conv-all", action="store_true", help="conv1d figure for every variant, not just the "
                   "default one (auto/rectangle/RN) and the baselines")
    g.add_argument("--sweep", metavar="JSON", help="a JSON list of tuning overrides (specssm/step/tuning.py), "
                   "e.g. '[{}, {\"coef\": {\"HB\": 4}}]': every checkpointing variant runs under each ({} for "
                   "the tables alone); rows carry it in `config`")
    g.add_argument("--d-conv", type=int, default=4, help="conv1d width (default 4)")
    g.add_argument("--pdl", action="store_true", help="conv1d figure with Programmatic Dependent Launch: "
                   "conv1d_update and checkpointing_ssu with pdl=True (rows get pdl = true; compare with a run "
                   "without it, in another --out)")
    t = ap.add_argument_group("timing")
    t.add_argument("--timer", default="cupti", choices=TIMERS, help="cupti: each step's span between marker "
                   "kernels in a CUPTI trace (default); events: CUDA events around whole graph replays, per "
                   "step (the quick loop: no profiler, no seed)")
    t.add_argument("--min-samples", type=int, help="steps timed per case (default 200; --quick 50)")
    t.add_argument("--cold-factor", type=float, default=4.0, help="state bytes between visits of a slot, x L2")
    t.add_argument("--max-sets", type=int, default=4096, help="most slot sets (steps) in one graph")
    t.add_argument("--mem-fraction", type=float, default=0.6, help="share of free GPU memory for the caches")
    t.add_argument("--seed", type=int, default=0, help="seed of the inputs, slot sets and acceptance draws")
    o = ap.add_argument_group("output")
    o.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    o.add_argument("--results-md", help="also write the summary markdown here (e.g. benchmarks/results/H100.md)")
    o.add_argument("--no-plots", dest="plots", action="store_false", help="write no figures (no matplotlib needed)")
    o.add_argument("--resume", action="store_true", help="keep the measured cases of --out/results.json "
                   "(same card) and run only the others")
    o.add_argument("--time-budget", type=float, help="seconds; start no new case after it "
                   f"(exit code {EXIT_INCOMPLETE} while cases remain)")
    o.add_argument("--strict", action="store_true", help="raise on the first failing case")
    o.add_argument("--kernels", action="store_true", help="after the run, print the registers, spills, shared "
                   "memory and warps of every compiled variant of the step kernels")
    o.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU)")
    o.add_argument("--render", metavar="JSON", help="re-render tables and plots from a results.json (no GPU)")
    return ap


def resolve(args) -> argparse.Namespace:
    """Fill unset lists: explicit flag > --quick / --all preset > default."""
    preset = QUICK if args.quick else ALL if args.all else {}
    for k, v in DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, preset.get(k, v))
    return args


def peer_of(args) -> pr.PeerSpec | None:
    """The --peer argument checked (ValueError naming it, what it got and what it expects), or None."""
    spec = getattr(args, "peer", None)
    return None if spec is None else pr.parse_peer(spec)


def sweep_configs(text) -> list[str]:
    """--sweep's overrides as sorted JSON ("" for {}: the tables alone); [""] without --sweep."""
    if text is None:
        return [""]
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--sweep: expected a JSON list of tuning overrides, got {text!r} ({e})") from None
    if not isinstance(overrides, list) or not overrides or not all(isinstance(o, dict) for o in overrides):
        raise ValueError(f"--sweep: expected a non-empty JSON list of objects (tuning overrides), got {text!r}")
    return [json.dumps(o, sort_keys=True) if o else "" for o in overrides]


def make_cases(args) -> list[cs.Case]:
    shapes = [cs.parse_shape(s) for s in args.shapes]
    peer = peer_of(args)
    if peer is not None and getattr(args, "timer", "cupti") == "events":
        raise ValueError("--peer: the events timer counts every op of a replay, the seed's wrapper ops "
                         "too; time the seed with --timer cupti")
    if args.T < 1:
        raise ValueError(f"--T: expected >= 1, got {args.T}")
    if not 0 <= args.W <= 16:
        raise ValueError(f"--W: expected 0 <= W <= 16, got {args.W}")
    return cs.expand(shapes=shapes, strategies=args.strategies, launches=args.launch, forms=args.no_write_form,
                     dtypes=args.dtypes, roundings=args.rounding, scenarios=args.scenarios, batches=args.batches,
                     T=args.T, W=args.W, peers=[peer.name] if peer else [],
                     configs=sweep_configs(getattr(args, "sweep", None)))


def render(rows, meta, out_dir: Path, results_md=None, plots=True) -> list[dict]:
    """Speedups, then results.csv / results.json / summary.md / PNGs in out_dir (and results_md)."""
    rows = report.add_speedups(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out_dir / "results.csv")
    report.write_json(rows, meta, out_dir / "results.json")
    md = report.summary_markdown(rows, meta)
    (out_dir / "summary.md").write_text(md)
    if results_md:
        Path(results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(results_md).write_text(md)
    if plots:
        from specssm.bench import plots as plotting
        plotting.plot_all(rows, meta, out_dir)
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    compiled_only = [f"--{k.replace('_', '-')}" for k in ("size", "repeats", "compile_backend", "device")
                     if getattr(args, k) is not None]
    if args.compiled and (args.materialize or args.render):
        print("specssm bench: --compiled: not with --materialize or --render", file=sys.stderr)
        return 2
    if compiled_only and not args.compiled:
        print(f"specssm bench: {', '.join(compiled_only)}: only with --compiled", file=sys.stderr)
        return 2
    if args.compiled:
        from specssm.bench import compiled
        return compiled.run(args)
    args.materialize_batches = args.batches or [1024]      # materialize: 1,024 pairs unless --batches
    args = resolve(args)
    if args.materialize:
        from specssm.bench import materialize
        try:
            [cs.parse_shape(s) for s in args.shapes]
        except ValueError as e:
            print(f"specssm bench: {e}", file=sys.stderr)
            return 2
        return materialize.run(args)
    out_dir = Path(args.out)
    if args.render:
        rows, meta = report.read_json(args.render)
        sys.stdout.write(report.rows_table(render(rows, meta, out_dir, args.results_md, args.plots)))
        return 0
    try:
        args.peer_spec = peer_of(args)
        cases = make_cases(args)
        hist = mix.load_histogram_csv(args.histogram) if args.histogram else dict(mix.DEFAULT_ACCEPTANCE)
        mix.acceptance_probs(hist, args.T)
    except ValueError as e:
        print(f"specssm bench: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for c in cases:
            k = c.key()
            print(f"{k['shape']} {k['variant']} {k['state_dtype']} {k['rounding']} {k['scenario']} batch={k['batch']}")
        print(f"{len(cases)} cases", file=sys.stderr)
        return 0

    from specssm.bench.timing import no_cuda
    if no_cuda("specssm bench", "--dry-run and --render work without one"):
        return 2
    from specssm.bench.runner import GpuBench
    t0 = time.monotonic()
    deadline = None if args.time_budget is None else t0 + args.time_budget
    kept = []
    bench = GpuBench(args, hist)
    meta = bench.meta
    if args.resume and (out_dir / "results.json").exists():
        old_rows, _ = report.read_json(out_dir / "results.json")
        kept = [r for r in old_rows if r.get("card") == bench.card and r.get("status") in ("ok", "skipped")]
        done = {report.row_id(r) for r in kept}
        probe = bench.base_row
        cases = [c for c in cases if report.row_id(probe(c)) not in done]
        print(f"specssm bench: resuming, {len(kept)} rows kept, {len(cases)} cases to run", file=sys.stderr)
    print(f"specssm bench: {bench.card}, copy {meta['copy_bw_GBps']:.0f} GB/s, L2 {bench.l2_bytes / 2**20:.0f} MiB, "
          f"{len(cases)} cases", file=sys.stderr)
    progress = report.Progress(len(cases))
    bench.progress = progress

    def save(new_rows):
        render(kept + new_rows, meta, out_dir, None, plots=False)

    rows, remaining = bench.run(cases, deadline=deadline, on_group_done=save)
    progress.close()
    render(kept + rows, meta, out_dir, args.results_md, args.plots)
    sys.stdout.write(report.rows_table(rows))
    if args.kernels:
        from specssm.bench.runner import compiled_kernels
        sys.stdout.write(report.kernels_table(compiled_kernels()))
    print(f"specssm bench: wrote {out_dir}/results.csv, results.json, summary.md"
          + (f", {args.results_md}" if args.results_md else ""), file=sys.stderr)
    if remaining:
        print(f"specssm bench: time budget reached, {remaining} cases left; run again with --resume",
              file=sys.stderr)
        return EXIT_INCOMPLETE
    print("specssm bench: complete", file=sys.stderr)
    return 0
