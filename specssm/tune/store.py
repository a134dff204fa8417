"""From the run log's results to outputs: schema-2 table entries (specssm/step/tables.py), the table file
of the card and a "tuned vs default" summary page.

Per entry (state dtype, rounding, T, W, shape), each tuned batch becomes a bucket holding every tuned
launch's knobs (all of them, not just those that differ from DEFAULT, so a later change of DEFAULT does
not change what the table means). split_min_batch comes from the crossover cases (fused winner against
split winner at the same batch, timed together): the smallest compared batch from which the split
family won at every compared batch; where the fused launch won at all of them, twice the largest
compared batch; without crossovers the entry leaves it to DEFAULT.
"""
from __future__ import annotations

import os
from pathlib import Path

from specssm.step import tables
from specssm.step.tuning import DEFAULT
from specssm.tune.space import config_of

KEY = tables.KEY_FIELDS


def _entry_key(target: dict) -> tuple:
    return tuple(target[f] for f in KEY)


def split_min_batch(crossovers: dict) -> int | None:
    """{batch: "fused" | "split"} of one entry -> its split_min_batch (module doc), None without data."""
    if not crossovers:
        return None
    batches = sorted(crossovers)
    start = None
    for b in reversed(batches):
        if crossovers[b] != "split":
            break
        start = b
    return start if start is not None else 2 * batches[-1]


def _merge_launches(bucket: dict, cfg: dict) -> None:
    for launch, fields in cfg.items():
        bucket.setdefault(launch, {}).update(fields)


def entries_from_results(results, runs: list) -> list[dict]:
    """Schema-2 entries of the logged results (tables.dumps order); each entry's provenance is the run
    of its newest result."""
    grouped: dict[tuple, dict] = {}
    for rec in results:
        t = rec["target"]
        g = grouped.setdefault(_entry_key(t), {"batches": {}, "timing": {}, "cross": {}, "run": -1})
        g["run"] = max(g["run"], rec.get("run", 0))
        b = str(t["batch"])
        if rec["family"] == "crossover":
            g["cross"][t["batch"]] = rec["winner"]
            g["timing"].setdefault(b, {})["crossover"] = {"fused_us": round(rec["fused_us"], 3),
                                                          "split_us": round(rec["split_us"], 3)}
            continue
        _merge_launches(g["batches"].setdefault(b, {}), config_of(rec["point"]))
        g["timing"].setdefault(b, {})[rec["family"]] = {"tuned_us": round(rec["tuned_us"], 3),
                                                        "default_us": round(rec["default_us"], 3)}
    entries = []
    for key, g in sorted(grouped.items()):
        e = dict(zip(KEY, key))
        smb = split_min_batch(g["cross"])
        if smb is not None:
            e["split_min_batch"] = smb
        e["provenance"] = provenance(runs[g["run"]]) if runs else None
        e["timing"] = g["timing"]
        e["batches"] = g["batches"]
        if e["provenance"] is None:
            del e["provenance"]
        entries.append(e)
    return entries


def provenance(run: dict) -> dict:
    return {f: run[f] for f in tables.PROVENANCE_FIELDS}


def table_of(card: str, log) -> dict:
    """The card's table of everything in the log, validated."""
    results = [r for r in log.results.values()]
    prov = provenance(log.runs[-1])
    table = {"schema": tables.SCHEMA, "card": card, "provenance": prov,
             "entries": entries_from_results(results, log.runs)}
    return tables.validate(table, DEFAULT)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)        # readers never see half a table


def summary_markdown(card: str, log) -> str:
    run = log.runs[-1]
    lines = [f"# specssm tune: {run['card']}", "",
             f"triton {run['triton']}, torch {run['torch']}, commit {run['commit']}, {run['date']}; "
             f"`{run['command']}`", "",
             "Tuned vs default (DEFAULT of specssm/step/tuning.py), timed together in the same process "
             "(median of interleaved rounds, µs):", "",
             "| state | rounding | T | W | H,P,N,G | batch | family | default | tuned | tuned/default | method "
             "| winner |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    from specssm.tune.space import describe
    for rec in sorted(log.results.values(), key=lambda r: (_entry_key(r["target"]), r["target"]["batch"],
                                                           r["family"])):
        t = rec["target"]
        head = f"| {t['state']} | {t['rounding']} | {t['T']} | {t['W']} | {t['H']},{t['P']},{t['N']},{t['G']} | " \
               f"{t['batch']} | {rec['family']} |"
        if rec["family"] == "crossover":
            lines.append(f"{head} fused {rec['fused_us']:.2f} | split {rec['split_us']:.2f} | "
                         f"{rec['split_us'] / rec['fused_us']:.3f} | head to head | {rec['winner']} |")
        else:
            lines.append(f"{head} {rec['default_us']:.2f} | {rec['tuned_us']:.2f} | "
                         f"{rec['tuned_us'] / rec['default_us']:.3f} | {rec['method']} | {describe(rec['point'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir, card: str, log) -> Path:
    """<card>.json (the tuned table) and summary.md in out_dir; returns the table's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{card}.json"
    _write(path, tables.dumps(table_of(card, log)))
    _write(out_dir / "summary.md", summary_markdown(card, log))
    return path
