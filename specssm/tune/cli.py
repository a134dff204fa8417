"""`specssm tune`: search the step's launch knobs on this GPU and write its tuning table (schema 2).

Each case is one family of launches (fused: the single launch; split: coefficient kernel + write and
no-write mains; replay: the fused kernel's split launches of the replay form) at one target (state
dtype, rounding, T, W, shape, batch), plus a crossover case where both fused and split are tuned at a
batch (which of the two winners launch="auto" should take there). Points are dropped by the analytic
rules of specssm/tune/space.py, then by offline sm_90 compiles (specssm/tune/offline.py), then timed
with the benchmark's method (CUDA graph over rotating slot sets, CUPTI spans; specssm/tune/gpu.py) and
searched as specssm/tune/search.py says (exhaustive or block coordinate descent, every winner confirmed
against the incumbent in the same process).

Output in --out: log.jsonl (every measurement, appended as it is made), <card>.json (the table of the
cases done so far), summary.md (tuned vs default). --time-budget stops before the first measurement
past it (exit code 3); --resume continues from log.jsonl, replaying its answers. --install merges the
tuned entries into specssm/step/configs/<card>.json. --dry-run lists the cases and the points of their
first sweep without a GPU; --synthetic runs everything against a synthetic cost model on a CPU.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

from specssm.bench.cases import SHAPE_SYNTAX, SHAPES
from specssm.bench.cases import parse_shape as bench_parse_shape
from specssm.tune import space
from specssm.tune.log import RunLog
from specssm.tune.search import Case, LogMismatch, Oracle, Pruner, Search, Settings, estimate_candidates, run_cases

EXIT_INCOMPLETE = 3
STATES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8", "fp8": "float8_e4m3fn"}
SEARCH_FIELDS = ("rounds", "confirm_rounds", "min_gain", "chunk", "exhaustive_limit", "max_sweeps", "restarts",
                 "max_spill", "compile_check", "check")


def _list(conv=str):
    def parse(text):
        return [conv(v.strip()) for v in text.split(",") if v.strip()]
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specssm tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to tune (comma-separated lists)")
    g.add_argument("--shapes", type=_list(), default=["super_tp8"],
                   help=f"named {sorted(SHAPES)} or {SHAPE_SYNTAX}, e.g. 64x80x128x8 (default super_tp8)")
    g.add_argument("--states", type=_list(), default=["bf16"],
                   help=f"state dtypes from {sorted(STATES)} (default bf16)")
    g.add_argument("--rounding", type=_list(), default=["rn"], help="rn, sr or rn,sr (default rn; sr is skipped "
                   "for fp32 states, which store without rounding)")
    g.add_argument("--T", type=_list(int), default=[6], help="tokens per verify step (default 6)")
    g.add_argument("--W", type=_list(int), default=[16], help="history windows (default 16)")
    g.add_argument("--batches", type=_list(int), default=[1, 8, 32, 64, 256, 1024],
                   help="batch buckets (default 1,8,32,64,256,1024)")
    g.add_argument("--families", type=_list(), default=["fused", "split"],
                   help=f"from {sorted(space.FAMILIES)} (default fused,split; replay: the replay no-write form)")
    g.add_argument("--fused-up-to", type=int, default=64,
                   help="tune the fused launch at batches up to this (default 64)")
    g.add_argument("--split-from", type=int, default=8, help="tune the split launches from this batch on (default 8)")
    s = ap.add_argument_group("search (a resumed run must use the logged run's values)")
    d = Settings()
    s.add_argument("--rounds", type=int, default=d.rounds,
                   help=f"interleaved rounds per screening (default {d.rounds})")
    s.add_argument("--confirm-rounds", type=int, default=d.confirm_rounds,
                   help=f"rounds of a confirmation, challenger against incumbent (default {d.confirm_rounds})")
    s.add_argument("--min-gain", type=float, default=d.min_gain,
                   help=f"a challenger's median must be this fraction faster (default {d.min_gain})")
    s.add_argument("--chunk", type=int, default=d.chunk, help=f"candidates per screening (default {d.chunk})")
    s.add_argument("--exhaustive-limit", type=int, default=d.exhaustive_limit,
                   help=f"search exhaustively up to this many valid points (default {d.exhaustive_limit})")
    s.add_argument("--max-sweeps", type=int, default=d.max_sweeps,
                   help=f"descent sweeps per start (default {d.max_sweeps})")
    s.add_argument("--restarts", type=int, default=d.restarts,
                   help=f"descents from random valid points after DEFAULT's (default {d.restarts})")
    s.add_argument("--compile-check", choices=["auto", "on", "off"], default="auto",
                   help="prune by offline sm_90 compiles (auto: on, except in --dry-run)")
    s.add_argument("--max-spill", type=int, default=d.max_spill,
                   help=f"drop points spilling more bytes per thread (default {d.max_spill})")
    s.add_argument("--workers", type=int, default=None, help="offline compile processes (default: CPU count)")
    s.add_argument("--no-check", dest="check", action="store_false",
                   help="keep a winner without comparing its outputs with DEFAULT's")
    s.add_argument("--sms", type=int, default=space.DEFAULT_SMS,
                   help=f"SMs assumed by --dry-run / --synthetic (default {space.DEFAULT_SMS}; a GPU run reads "
                        "its own)")
    o = ap.add_argument_group("run")
    o.add_argument("--out", default="out/tune",
                   help="output folder: log.jsonl, <card>.json, summary.md (default out/tune)")
    o.add_argument("--resume", action="store_true", help="continue the run logged in --out/log.jsonl")
    o.add_argument("--time-budget", type=float,
                   help=f"seconds; no measurement starts after it (exit code {EXIT_INCOMPLETE})")
    o.add_argument("--dry-run", action="store_true", help="list the cases and the points of their first sweep (no GPU)")
    o.add_argument("--show-pruned", action="store_true", help="with --dry-run: also the dropped points and why")
    o.add_argument("--synthetic", action="store_true",
                   help="time with the synthetic cost model (CPU; for trying the tuner)")
    o.add_argument("--noise", type=float, default=0.01, help="--synthetic: relative noise of a sample (default 0.01)")
    o.add_argument("--install", action="store_true",
                   help="merge the tuned entries into specssm/step/configs/<card>.json")
    return ap


def parse_shape(spec: str) -> tuple:
    """(H, P, N, G) of a shape as `specssm bench` takes it (bench.cases.parse_shape: the same syntax)."""
    s = bench_parse_shape(spec)
    return s.H, s.P, s.N, s.G


def plan_cases(args, num_sms: int) -> list[Case]:
    """The cases of a run, entry by entry (shape > state > rounding > T > W), batch by batch: the
    families tuned at that batch, then their crossover."""
    for name, values, allowed in (("--states", args.states, STATES), ("--rounding", args.rounding, ("rn", "sr")),
                                  ("--families", args.families, space.FAMILIES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name}: expected values from {sorted(allowed)}, got {bad[0]!r}")
    if any(not 1 <= T <= 16 for T in args.T) or any(not 0 <= W <= 16 for W in args.W):
        raise ValueError(f"--T / --W: expected 1 <= T <= 16 and 0 <= W <= 16, got {args.T} / {args.W}")
    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches: expected positive batch sizes, got {args.batches}")
    cases = []
    for shape in args.shapes:
        H, P, N, G = parse_shape(shape)
        for st in args.states:
            for rnd in args.rounding:
                if rnd == "sr" and st == "fp32":
                    continue
                for T in args.T:
                    for W in args.W:
                        for b in args.batches:
                            t = space.Target(STATES[st], rnd, T, W, H, P, N, G, b, num_sms)
                            fams = [f for f in args.families if (f != "fused" or b <= args.fused_up_to)
                                    and (f == "fused" or b >= args.split_from)]
                            cases += [Case(t, f) for f in fams]
                            if "fused" in fams and "split" in fams:
                                cases.append(Case(t, "crossover"))
    return cases


def settings_of(args, dry_run=False) -> Settings:
    compile_check = args.compile_check == "on" or (args.compile_check == "auto" and not dry_run)
    return Settings(rounds=args.rounds, confirm_rounds=args.confirm_rounds, min_gain=args.min_gain,
                    chunk=args.chunk, exhaustive_limit=args.exhaustive_limit, max_sweeps=args.max_sweeps,
                    restarts=args.restarts, max_spill=args.max_spill, compile_check=compile_check,
                    check=args.check)


def dry_run(cases, settings: Settings, pruner: Pruner, show_pruned: bool, out=None) -> int:
    """Print each case and the points its search times first: every valid point of an exhaustive case,
    the first sweep's neighbours of DEFAULT per block of a descent (later sweeps depend on timings)."""
    out = out or sys.stdout
    total = 0
    for case in cases:
        est = estimate_candidates(case, settings)
        total += est
        if case.family == "crossover":
            print(f"case {case.id}: the fused and split winners head to head (2 candidates)", file=out)
            continue
        fam, t = space.FAMILIES[case.family], case.target
        n = space.count_valid(fam, t)
        start = space.default_point(fam, t)
        method = "exhaustive" if n <= settings.exhaustive_limit else f"bcd x{1 + settings.restarts}"
        print(f"case {case.id}: {n} valid points, {method}, ~{est} candidate timings", file=out)
        why = space.point_reason(fam, start, t) or pruner.reasons(t, fam, [start])[0]
        print(f"  start  {space.describe(start)}  [DEFAULT{'; ' + why if why else ''}]", file=out)
        if n <= settings.exhaustive_limit:
            groups = [("all", fam.launches, [p for p in space.all_points(fam, t) if p != start])]
        else:       # a block's points are judged on its launch (the others are the incumbent's)
            groups = [(f"{launch} {','.join(names)}", (launch,), space.block_points(fam, start, (launch, names)))
                      for launch, names in fam.blocks]
        for label, launches, pts in groups:
            reasons = [next((r for r in (space.launch_reason(la, p[la], t) for la in launches) if r), None)
                       for p in pts]
            compiled = pruner.reasons(t, fam, [p for p, r in zip(pts, reasons) if r is None], launches)
            reasons = [r if r is not None else compiled.pop(0) for r in reasons]
            kept = sum(r is None for r in reasons)
            print(f"  block {label}: {kept} points" + (f" ({len(pts) - kept} pruned)" if kept < len(pts) else ""),
                  file=out)
            for p, r in zip(pts, reasons):
                changed = {launch: knobs for launch, knobs in p.items() if knobs != start[launch]}
                if r is None:
                    print(f"    {space.describe(changed)}", file=out)
                elif show_pruned:
                    print(f"    - {space.describe(changed)}: {r}", file=out)
    print(f"{len(cases)} cases, ~{total} candidate timings", file=out)
    return 0


class Progress:
    """One line per measurement on stderr: elapsed, ETA from the candidate timings still expected (a
    rough estimate: descents stop early or late), the case and the request's best median."""

    def __init__(self, cases, settings, log, stream=None):
        self.stream = stream or sys.stderr
        self.settings, self.log = settings, log
        self.todo = {c.id: estimate_candidates(c, settings) for c in cases if c.id not in log.results}
        self.t0, self.timed, self.current = time.monotonic(), 0, None

    def on_live(self, case, kind, candidates, rounds, answer, elapsed):
        self.timed += len(candidates)
        self.todo[case.id] = max(1, self.todo.get(case.id, 1) - len(candidates))
        el = time.monotonic() - self.t0
        eta = el / max(self.timed, 1) * sum(self.todo.values())
        best = min(sorted(a)[len(a) // 2] for a in answer) if kind == "time" else None
        what = f"best {best:.2f} us of {len(candidates)}" if best is not None else "output check"
        self.stream.write(f"[{el:6.0f}s eta ~{eta:5.0f}s] {case.id}: {what}\n")
        self.stream.flush()

    def on_result(self, case, rec):
        self.todo.pop(case.id, None)
        if rec["family"] == "crossover":
            msg = f"{rec['winner']} (fused {rec['fused_us']:.2f}, split {rec['split_us']:.2f} us)"
        else:
            msg = (f"{rec['tuned_us']:.2f} us against default {rec['default_us']:.2f} ({rec['method']}, "
                   f"check {rec['check']})")
        self.stream.write(f"done {case.id}: {msg}\n")
        self.stream.flush()


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "specssm"], cwd=root).returncode != 0
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_record(timer, argv, settings: Settings) -> dict:
    import torch
    import triton
    return {"type": "run", "card": timer.device_name, "card_name": timer.card, "num_sms": timer.num_sms,
            "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "specssm tune " + " ".join(argv), "commit": _commit(),
            "settings": {f: getattr(settings, f) for f in SEARCH_FIELDS}}


def make_timer(args):
    if args.synthetic:
        from specssm.tune.synthetic import SyntheticTimer
        timer = SyntheticTimer(noise=args.noise)
        timer.num_sms = args.sms
        return timer
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("expected a CUDA device, got none (--dry-run and --synthetic work without one)")
    from specssm.tune.gpu import GpuTimer
    return GpuTimer()


def install(card: str, tuned: dict) -> Path:
    """Merge the tuned table's entries into the shipped table of the card."""
    from specssm.step import tables, tuning
    path = tuning.TABLE_DIR / f"{card}.json"
    base = tuning.read_table(path, card) if path.exists() else \
        {"schema": tables.SCHEMA, "card": card, "provenance": tuned["provenance"], "entries": []}
    merged = tables.validate(tables.merge_entries(base, tuned["entries"], tuned["provenance"]), tuning.DEFAULT)
    path.write_text(tables.dumps(merged))
    return path


def main(argv=None, timer=None, clock=None) -> int:
    """`timer` / `clock` stand in for the GPU timer and time.monotonic (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log_path = Path(args.out) / "log.jsonl"
    try:
        settings = settings_of(args, dry_run=args.dry_run)
        cases = plan_cases(args, args.sms)
        if args.dry_run:
            return dry_run(cases, settings, Pruner(RunLog(Path(args.out) / "dry_run_compiles.jsonl"), settings,
                                                   _compiler(args)), args.show_pruned)
        if log_path.exists() and not args.resume:
            raise ValueError(f"--out: {log_path} exists; pass --resume to continue it or choose another --out")
        timer = timer or make_timer(args)
        cases = plan_cases(args, timer.num_sms)        # the card's SMs decide which grids are distinct
        log = RunLog(log_path)
        rec = run_record(timer, argv, settings)
        if log.runs:
            first = log.runs[0]
            if first["settings"] != rec["settings"] or first["card_name"] != timer.card:
                raise ValueError(f"--resume: {log_path} was tuned on {first['card_name']} with {first['settings']}; "
                                 f"this run: {timer.card} with {rec['settings']}")
        log.append(rec)
    except (ValueError, RuntimeError) as e:
        print(f"specssm tune: {e}", file=sys.stderr)
        return 2
    from specssm.tune import store
    clock = clock or time.monotonic
    deadline = None if args.time_budget is None else clock() + args.time_budget
    progress = Progress(cases, settings, log)
    oracle = Oracle(log, timer, deadline=deadline, clock=clock, on_live=progress.on_live)
    search = Search(oracle, Pruner(log, settings, _compiler(args)), settings)

    def on_result(case, rec):
        progress.on_result(case, rec)
        store.write_outputs(args.out, timer.card, log)

    done_before = sum(c.id in log.results for c in cases)
    print(f"specssm tune: {timer.device_name}, {len(cases)} cases ({done_before} done), log {log_path}",
          file=sys.stderr)
    try:
        left = run_cases(cases, search, log, len(log.runs) - 1, on_result)
    except LogMismatch as e:
        print(f"specssm tune: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:     # e.g. the profiler lost activity: what was measured stays in the log
        print(f"specssm tune: {type(e).__name__}: {e}; the log is kept, run again with --resume", file=sys.stderr)
        return 1
    if log.results:
        path = store.write_outputs(args.out, timer.card, log)
        print(f"specssm tune: wrote {path} and {Path(args.out) / 'summary.md'} ({oracle.live} measurements, "
              f"{oracle.replayed} replayed from the log)", file=sys.stderr)
        if args.install:
            print(f"specssm tune: merged into {install(timer.card, store.table_of(timer.card, log))}", file=sys.stderr)
    if left:
        print(f"specssm tune: time budget reached, {left} cases left; run again with --resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    print("specssm tune: complete", file=sys.stderr)
    return 0


def _compiler(args):
    from specssm.tune import offline
    return lambda jobs: offline.compile_jobs(jobs, workers=args.workers)
