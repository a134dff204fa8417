"""Result rows -> speedups, markdown tables, CSV and JSON (pure, CPU-safe)."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
import time
from pathlib import Path

# Columns of the CSV, in order; rows may carry more keys (kept in the JSON).
CSV_COLUMNS = [
    "card", "torch", "triton", "date", "shape", "H", "P", "N", "G", "T", "W", "act_dtype", "z",
    "strategy", "launch", "no_write_form", "variant", "config", "state_dtype", "rounding", "scenario", "batch",
    "timer", "status", "reason", "median_us", "p10_us", "p90_us", "mean_us", "busy_us", "samples",
    "kernels_per_step", "plan_us", "pdl", "conv_median_us", "conv_p10_us", "conv_p90_us",
    "speedup_vs_always_write", "speedup_vs_all_states", "speedup_vs_seed", "write_frac", "mean_pnat", "bytes_per_step",
    "floor_us", "pct_floor", "conv_floor_us", "conv_pct_floor", "copy_bw_GBps", "slot_sets", "cold_x_L2",
]

# What makes two rows the same measurement (used by --resume and to find baselines).
IDENTITY = ("card", "shape", "H", "P", "N", "G", "T", "W", "act_dtype", "z", "strategy", "launch",
            "no_write_form", "config", "state_dtype", "rounding", "scenario", "batch", "pdl", "timer")
# Values of identity keys that rows written before the key existed lack.
_IDENTITY_DEFAULTS = {"pdl": False, "config": "", "timer": "cupti"}
# The peer whose median makes `× seed` (`--peer trtllm=PATH`): TensorRT-LLM's Triton kernel, the seed
# (docs/performance.md).
SEED = "trtllm"
# What a checkpointing row and the seed's row share to be compared (the seed runs in the same scenarios).
_SEED_KEY = ("card", "shape", "H", "P", "N", "G", "T", "W", "act_dtype", "z", "state_dtype", "rounding", "scenario",
             "batch")


def card_slug(name: str) -> str:
    """Short file-name-safe card name: 'NVIDIA H100 80GB HBM3' -> 'H100'."""
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name)
    if m:
        return m.group(1)
    return re.sub(r"[^A-Za-z0-9]+", "-", name.replace("NVIDIA", "")).strip("-") or "gpu"


def row_id(row: dict) -> tuple:
    return tuple(row.get(k, _IDENTITY_DEFAULTS.get(k)) for k in IDENTITY)


def _ok(row) -> bool:
    return row.get("status") == "ok" and _num(row.get("median_us")) is not None


def _num(v):
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def has_seed(rows) -> bool:
    """Whether the rows hold the seed's own rows (a run with --peer trtllm=PATH)."""
    return any(r.get("strategy") == SEED for r in rows)


def _seed_key(r) -> tuple:
    return tuple(r.get(k) for k in _SEED_KEY)


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup_vs_always_write / _all_states = baseline median / row median, for rows of the same card,
    shape, T, act dtype, z, state dtype and batch (always-write also the same rounding; all-states
    stores round-to-nearest only). Baseline rows get the speedup over the other baseline.
    speedup_vs_seed (`× seed`) = the seed's median / row median, for our checkpointing rows of the same
    card, shape, T, W, act dtype, z, state dtype, rounding, scenario and batch; None without the seed.
    In place."""
    def base_key(r, with_rounding):
        k = (r.get("card"), r.get("shape"), r.get("T"), r.get("act_dtype"), r.get("z"), r.get("state_dtype"),
             r.get("batch"))
        return k + ((r.get("rounding"),) if with_rounding else ())

    aw = {base_key(r, True): float(r["median_us"]) for r in rows if r.get("strategy") == "always_write" and _ok(r)}
    al = {base_key(r, False): float(r["median_us"]) for r in rows if r.get("strategy") == "all_states" and _ok(r)}
    seed = {_seed_key(r): float(r["median_us"]) for r in rows if r.get("strategy") == SEED and _ok(r)}
    for r in rows:
        r["speedup_vs_always_write"] = r["speedup_vs_all_states"] = r["speedup_vs_seed"] = None
        if not _ok(r):
            continue
        t = float(r["median_us"])
        if r.get("strategy") == "checkpointing" and _seed_key(r) in seed:
            r["speedup_vs_seed"] = seed[_seed_key(r)] / t
        if r.get("strategy") != "always_write" and base_key(r, True) in aw:
            r["speedup_vs_always_write"] = aw[base_key(r, True)] / t
        if r.get("strategy") != "all_states" and base_key(r, False) in al:
            r["speedup_vs_all_states"] = al[base_key(r, False)] / t
    return rows


# ---- formatting ---------------------------------------------------------------------------------
def fmt(v, digits=1) -> str:
    """Numbers for tables: None/nan -> '-', floats with `digits` decimals, others as str."""
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and math.isnan(v):
        return "-"
    f = _num(v)
    if f is None:
        return str(v)
    return f"{f:.{digits}f}"


def fmt_x(v) -> str:
    f = _num(v)
    return "-" if f is None else f"{f:.2f}x"


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    align = []
    for j, _ in enumerate(headers):
        col = [r[j] for r in cells if j < len(r) and r[j] != "-"]
        numeric = all(re.fullmatch(r"[-+]?[\d.]+(x|%)?( \(.*\))?", c) for c in col)
        align.append("---:" if numeric else "---")
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out) + "\n"


def rows_table(rows: list[dict]) -> str:
    """All rows, one line each (what the run printed while it went)."""
    seed = has_seed(rows)
    headers = ["shape", "variant", "dtype", "rnd", "scenario", "batch", "median µs", "p10–p90 µs",
               "with conv µs", "plan µs", "× AW", "× AS"] + (["× seed"] if seed else []) + ["% floor", "status"]
    body = []
    for r in rows:
        ok = _ok(r)
        body.append([r.get("shape"), r.get("variant"), r.get("state_dtype"), r.get("rounding"), r.get("scenario"),
                     r.get("batch"), fmt(r.get("median_us"), 2) if ok else "-",
                     f"{fmt(r.get('p10_us'), 2)}–{fmt(r.get('p90_us'), 2)}" if ok else "-",
                     fmt(r.get("conv_median_us"), 2), fmt(r.get("plan_us"), 2),
                     fmt_x(r.get("speedup_vs_always_write")), fmt_x(r.get("speedup_vs_all_states"))]
                    + ([fmt_x(r.get("speedup_vs_seed"))] if seed else [])
                    + [fmt(r.get("pct_floor")), r.get("status") if ok else f"{r.get('status')}: {r.get('reason')}"])
    return markdown_table(headers, body)


def _groups(rows, keys):
    seen = {}
    for r in rows:
        seen.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return seen


def _best(rows):
    ok = [r for r in rows if _ok(r)]
    return min(ok, key=lambda r: float(r["median_us"])) if ok else None


# The tracker's speed targets (issue #6, stated for T = 6, W = 16, mixed pnat): (what, row field, from
# batch, bound, state dtypes). Ratios and % floor must reach the bound; latencies must stay under it.
TARGETS = (
    ("× always-write ≥ 1.3 at batch ≥ 64", "speedup_vs_always_write", 64, 1.3, ("fp32", "fp16")),
    ("× all-states ≥ 4 at batch ≥ 256", "speedup_vs_all_states", 256, 4.0, ("fp32", "fp16")),
    ("% floor ≥ 92 at batch ≥ 256", "pct_floor", 256, 92.0, ("fp32", "bf16", "fp16")),
    ("% floor ≥ 75 at batch ≥ 256", "pct_floor", 256, 75.0, ("int8", "fp8")),
)
LATENCY_TARGETS = ((1, 3.5), (8, 5.0))      # (batch, µs of the state update)


def targets_markdown(rows: list[dict]) -> str:
    """Each target of the tracker against the best checkpointing variant of each (shape, state dtype,
    rounding) in the mixed scenario: the worst measured value in the target's batch range and by how
    much it is missed. Empty when the run has no mixed checkpointing rows."""
    ck = [r for r in rows if r.get("strategy") == "checkpointing" and r.get("scenario") == "mixed"]
    body = []
    for (shape, dt, rnd), grp in _groups(ck, ("shape", "state_dtype", "rounding")).items():
        best = {b: _best(g) for (b,), g in _groups(grp, ("batch",)).items()}
        best = {int(b): r for b, r in best.items() if r is not None}
        for what, field, from_batch, bound, dtypes in TARGETS:
            vals = [(_num(r.get(field)), b) for b, r in best.items() if b >= from_batch]
            vals = [(v, b) for v, b in vals if v is not None]
            if dt not in dtypes or not vals:
                continue
            worst, b = min(vals)
            status = "met" if worst >= bound else f"missed by {fmt(bound / worst, 2)}×"
            body.append([shape, dt, rnd.upper(), what, f"{fmt(worst, 2)} (batch {b})", status])
        for batch, bound in LATENCY_TARGETS:
            r = best.get(batch)
            if r is None:
                continue
            us, floor = float(r["median_us"]), _num(r.get("floor_us"))
            status = "met" if us <= bound else f"missed by {fmt(us / bound, 2)}×"
            if floor is not None and floor > bound:
                status += f" (the byte floor alone is {fmt(floor, 2)} µs: out of reach on this card)"
            body.append([shape, dt, rnd.upper(), f"batch {batch} ≤ {bound} µs", f"{fmt(us, 2)} µs", status])
    if not body:
        return ""
    return ("\n## Against the targets\n\nThe targets of the issue tracker (stated for T = 6, W = 16, mixed pnat), "
            "each against the worst measured value of its batch range (best checkpointing variant). Why they are "
            "missed, with Nsight Compute evidence, and what would close the gap: docs/performance.md.\n\n"
            + markdown_table(["shape", "state", "rnd", "target", "worst measured", "status"], body))


def _seed_cell(row) -> str:
    """The seed's own median, or its status where it did not run ('skipped': reason under Not measured)."""
    if row is None:
        return "-"
    return fmt(row["median_us"], 2) if _ok(row) else str(row.get("status"))


def summary_markdown(rows: list[dict], meta: dict) -> str:
    """The results page: the run's card and settings, then per (shape, scenario, state dtype, rounding)
    the best checkpointing variant against both baselines, every checkpointing variant side by side,
    and the baselines with their own floors."""
    out = [f"# specssm bench — {meta.get('card', '?')}\n\n"]
    out.append(
        f"- card: **{meta.get('card')}** (L2 {fmt((meta.get('l2_bytes') or 0) / 2**20, 0)} MiB), "
        f"copy bandwidth **{fmt(meta.get('copy_bw_GBps'), 0)} GB/s** (device-to-device copy, bytes read + written)\n"
        f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, date {meta.get('date')}\n"
        f"- T = {meta.get('T')}, W = {meta.get('W')}, activations {meta.get('act_dtype')}, z gate "
        f"{'on' if meta.get('z') else 'off'}, conv1d d_conv = {meta.get('d_conv')}"
        f"{' (with conv: conv1d and checkpointing launched with PDL)' if meta.get('pdl') else ''}; state cold "
        f"(≥ {meta.get('cold_factor')}× L2 of states between visits of a slot), inputs hot\n"
        f"- command: `{meta.get('command')}`\n"
        + ("- timer **events** (the quick loop): µs = CUDA-event time of a whole graph replay / its steps, not "
           "the CUPTI spans below; p10–p90 spread over replays\n" if meta.get("timer") == "events" else ""))
    seed = has_seed(rows)
    out.append(COLUMN_NOTES + (SEED_NOTE if seed else ""))
    out.append(targets_markdown(rows))
    ck = [r for r in rows if r.get("strategy") in ("checkpointing", SEED)]
    seed_of = {_seed_key(r): r for r in ck if r.get("strategy") == SEED}
    keyset = ("shape", "scenario", "state_dtype", "rounding")
    for key, grp in _groups(ck, keyset).items():
        shape, scenario, dt, rnd = key
        out.append(f"\n## {shape} · {scenario} · state {dt} · {rnd.upper()}\n")
        seed_alone = {r.get("batch"): r for r in grp if r.get("strategy") == SEED}
        grp = [r for r in grp if r.get("strategy") == "checkpointing"]
        byb = _groups(grp, ("batch",))
        body = []
        for batch in sorted({r.get("batch") for r in grp} | set(seed_alone)):
            g = byb.get((batch,), [])
            b = _best(g)
            sr = seed_of.get(_seed_key(b or g[0])) if g else seed_alone[batch]
            seed_cells = [_seed_cell(sr)] if seed else []
            if b is None:   # ours did not run (or, in a run of the seed alone, was not asked for)
                label = "skipped: " + "; ".join(sorted({str(r.get("reason")) for r in g}))[:120] if g else "not run"
                body.append([batch, "-", label] + ["-"] * 5 + seed_cells
                            + ["-"] * ((1 if seed else 0) + 3))
                continue
            conv = [r for r in g if _num(r.get("conv_median_us")) is not None]
            body.append([batch, fmt(b["median_us"], 2), b.get("variant"),
                         f"{fmt(b.get('p10_us'), 2)}–{fmt(b.get('p90_us'), 2)}",
                         fmt(conv[0]["conv_median_us"], 2) if conv else "-", fmt(b.get("plan_us"), 2),
                         fmt_x(b.get("speedup_vs_always_write")), fmt_x(b.get("speedup_vs_all_states"))]
                        + (seed_cells + [fmt_x(b.get("speedup_vs_seed"))] if seed else [])
                        + [fmt(b.get("floor_us"), 2), fmt(b.get("pct_floor")), fmt(b.get("write_frac"), 2)])
        out.append(markdown_table(["batch", "ckpt µs", "best variant", "p10–p90 µs", "with conv µs", "plan µs",
                                   "× always-write", "× all-states"] + ([f"{SEED} µs", "× seed"] if seed else [])
                                  + ["floor µs", "% floor", "write frac"], body))
        labels = sorted({r.get("variant") for r in grp})
        if len(labels) > 1:
            out.append("\nEvery checkpointing variant (median µs):\n\n")
            vb = []
            for (batch,), g in sorted(byb.items()):
                m = {r.get("variant"): r for r in g}
                vb.append([batch] + [fmt(m[v].get("median_us"), 2) if v in m and _ok(m[v]) else "-" for v in labels])
            out.append(markdown_table(["batch"] + labels, vb))
    base = [r for r in rows if r.get("strategy") in ("always_write", "all_states")]
    for key, grp in _groups(base, ("shape", "state_dtype", "rounding")).items():
        shape, dt, rnd = key
        out.append(f"\n## Baselines · {shape} · state {dt} · {rnd.upper()}\n")
        body = []
        for (batch,), g in sorted(_groups(grp, ("batch",)).items()):
            m = {r.get("strategy"): r for r in g}
            line = [batch]
            for s in ("always_write", "all_states"):
                r = m.get(s)
                if r is None:
                    line += ["-", "-", "-"]
                elif not _ok(r):
                    line += [f"{r.get('status')}", "-", "-"]
                else:
                    line += [fmt(r["median_us"], 2), fmt(r.get("conv_median_us"), 2), fmt(r.get("pct_floor"))]
            body.append(line)
        out.append(markdown_table(["batch", "always-write µs", "with conv µs", "% floor", "all-states µs",
                                   "with conv µs", "% floor"], body))
    skipped = [r for r in rows if r.get("status") != "ok"]
    if skipped:
        out.append(f"\n## Not measured ({len(skipped)} cases)\n\n")
        reasons = _groups(skipped, ("status", "reason"))
        out.append(markdown_table(["status", "reason", "cases"],
                                  [[k[0], str(k[1])[:160], len(v)] for k, v in sorted(reasons.items(), key=str)]))
    return "".join(s if s.endswith("\n") else s + "\n" for s in out)


COLUMN_NOTES = """
Columns:
- **µs** (median, p10–p90): per step, from the start of the first kernel of the step to the end of its last
  kernel (CUPTI timestamps via torch.profiler), over many steps replayed from one CUDA graph; one layer.
- **with conv µs**: the span of the conv1d update launched before the step plus the step (default
  variant auto/rectangle/RN and the baselines). Rows with `pdl` true (`--pdl`): conv1d and the
  checkpointing step chained with Programmatic Dependent Launch (the baselines' rows are unchanged).
- **plan µs**: building the per-step plan (once per step, shared by all layers), timed on its own; not
  included in µs.
- **× always-write / × all-states**: baseline median / this median (same card, shape, dtype, batch).
- **floor µs**: bytes the step must move (state read, state write on flush rows + scales, history,
  new inputs, outputs, ring appends; benchmarks/README.md) / the copy bandwidth above. **% floor** = floor / median.
- **write frac**: fraction of rows that flush their state in the measured steps.
"""
SEED_NOTE = f"""- **{SEED} µs / × seed**: TensorRT-LLM's Triton checkpointing kernel, the seed
  (`--peer {SEED}=PATH`), as shipped (its own tuning table), on the same caches, slot sets, pnat mix and
  inputs in the same run; its span runs from its first to its last kernel named `*precompute*` or
  `*persistent*`, leaving out the torch gather/scatter its wrapper adds to read our ring layout.
  × seed = seed median / the best variant's median.
"""


# ---- specssm bench --compiled (specssm/bench/compiled.py) -------------------------------------------
def _compiled_check(rs) -> str:
    """The `vs eager` cell of one variant over its batches."""
    if any(r["status"] != "ok" for r in rs):
        return "error"
    if rs[0]["variant"] == "eager":
        return "(reference)"
    text = "bitwise" if all(r["bitwise"] for r in rs) else (
        f"logits ≤ {max(r['logits_rel_err'] for r in rs):.0e}, cache ≤ {max(r['cache_rel_err'] for r in rs):.0e}"
        + ("" if all(r["ints_equal"] for r in rs) else ", integer tensors DIFFER"))
    if all("bitwise_vs_compiled" in r for r in rs):
        text += "; = compiled bitwise" if all(r["bitwise_vs_compiled"] for r in rs) else "; ≠ compiled"
    return text


def compiled_markdown(rows: list[dict], meta: dict) -> str:
    """The `--compiled` page: the run's card, versions and method, then per state dtype a variant x batch
    table of µs per step and × eager."""
    m, c = meta, meta["model"]
    timer = ("CUDA events around one step, the stream idle before it and synchronized after it (launch time "
             "included)" if m["device"] == "cuda" else "wall clock around one step")
    out = [f"# specssm bench --compiled — {m['card']}\n\n",
           f"- card: **{m['card']}**; torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, "
           f"Python {m['python']}, date {m['date']}\n",
           f"- model: TinyMamba2LM '{m['size']}' (d_model {c['d_model']}, {c['n_layers']} layers, H {c['nheads']}, "
           f"P {c['head_dim']}, N {c['d_state']}, G {c['ngroups']}, vocab {c['vocab_size']}), activations "
           f"{m['act']}, precision {m['precision']}; checkpointing cache, T = {m['T']}, W = {m['W']}\n",
           f"- step: `TinyMamba2LM.step_unchecked` (validate=False, no commit), after {m['warm']} eager step(s) with "
           f"commits; each variant first ran {m['check']} committed steps beside eager (`vs eager`)\n",
           f"- µs per step: median of {m['repeats']} steps, {timer}; × eager = eager µs / variant µs\n",
           f"- command: `{m['command']}`\n"]
    for state in m["dtypes"]:
        rs = [r for r in rows if r["state_dtype"] == state]
        body = []
        for v in m["variants"]:
            vr = [r for r in rs if r["variant"] == v]
            cells = [f"{r['median_us']:.1f} ({fmt_x(r.get('x_eager')).replace('x', '×')})" if "median_us" in r
                     else "-" for r in vr]
            body.append([m["labels"][v], vr[0]["timer"], *cells, _compiled_check(vr)])
        head = ["variant", "timer", *[f"batch {b}: µs (× eager)" for b in m["batches"]], "vs eager"]
        out.append(f"\n## state {state}\n\n" + markdown_table(head, body))
        out.append("\nRows writing their checkpoint in the timed step: " + ", ".join(
            f"batch {r['batch']}: {r['writes']}/{r['batch']}" for r in rs if r["variant"] == "eager") + ".\n")
        out += [f"- {r['label']}, batch {r['batch']}: {r.get('error') or r.get('note')}\n" for r in rs
                if r.get("error") or r.get("note")]
    return "".join(out)


def kernels_table(kernels: list[dict]) -> str:
    """`specssm bench --kernels`: one line per compiled variant of a step kernel (runner.compiled_kernels)."""
    if not kernels:
        return "no step kernel was compiled in this run\n"
    return markdown_table(["kernel", "regs", "spills", "shared B", "warps", "specialization (end)"],
                          [[k["kernel"], k["regs"], k["spills"], k["shared"], k["warps"], str(k["key"])[-120:]]
                           for k in kernels])


def write_csv(rows: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(csv_text(rows))


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _json_safe(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(rows: list[dict], meta: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_safe({"meta": meta, "rows": rows}), f, indent=1)
        f.write("\n")


def read_json(path) -> tuple[list[dict], dict]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError(f"{path}: expected a JSON object with 'meta' and 'rows' (written by specssm bench)")
    return data["rows"], data.get("meta", {})


# ---- progress ------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr: done/total, elapsed, ETA, the case and its result."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.t0 = total, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, case, row):
        self.done += 1
        el = time.monotonic() - self.t0
        eta = el / self.done * (self.total - self.done)
        k = case.key()
        res = (f"{float(row['median_us']):9.2f} us {fmt(row.get('pct_floor'))}% floor" if row.get("status") == "ok"
               else f"{row.get('status')}: {str(row.get('reason'))[:60]}")
        line = (f"[{self.done}/{self.total} {el:5.0f}s eta {eta:5.0f}s] {k['shape']} {k['variant']} "
                f"{k['state_dtype']} {k['rounding']} {k['scenario']} b={k['batch']}: {res}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty and self.done != self.total:
            self.stream.write("\n")
            self.stream.flush()
