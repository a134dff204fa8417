"""PNG plots of a run (matplotlib, Agg backend, imported only when plotting).

Per (shape, scenario, rounding), one panel per state dtype:
    time_<shape>_<scenario>_<rounding>.png        median µs vs batch, log-log, one line per strategy variant
    time_conv_<shape>_<scenario>_<rounding>.png   the same with the conv1d in front of the step
    floor_<shape>_<scenario>_<rounding>.png       % of the byte floor vs batch
Baselines (scenario "any") are drawn in every scenario's panels; the seed (`--peer trtllm=PATH`) beside our
checkpointing variants.
"""
from __future__ import annotations

import math
from pathlib import Path

from specssm.bench.report import SEED

PEER_STYLE = {SEED: {"color": "tab:red", "linestyle": "-."}}
BASELINE_STYLE = {"always-write": dict(color="black", linestyle="--"), "all-states": dict(color="gray", linestyle=":")}


def _series(rows, value_key):
    """{variant label: sorted [(batch, value)]} for rows with a value."""
    out = {}
    for r in rows:
        v = r.get(value_key)
        if r.get("status") != "ok" or v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out.setdefault(r["variant"], []).append((int(r["batch"]), float(v)))
    return {k: sorted(v) for k, v in out.items()}


def plot_all(rows: list[dict], meta: dict, out_dir) -> list[Path]:
    """Write the PNGs; returns their paths (empty if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = meta.get("card", "")
    written = []
    ck = [r for r in rows if r.get("strategy") in ("checkpointing", SEED)]
    base = [r for r in rows if r.get("strategy") in ("always_write", "all_states")]
    figures = sorted({(r["shape"], r["scenario"], r["rounding"]) for r in ck})
    if not figures:  # baselines only
        figures = sorted({(r["shape"], "any", r["rounding"]) for r in base})
    for shape, scenario, rnd in figures:
        dtypes = [d for d in ("fp32", "bf16", "fp16", "int8", "fp8")
                  if any(r["state_dtype"] == d and r["shape"] == shape for r in rows)]
        for kind, key, ylabel, logy in (("time", "median_us", "µs per step (median)", True),
                                        ("time_conv", "conv_median_us", "µs per step incl. conv1d (median)", True),
                                        ("floor", "pct_floor", "% of byte floor", False)):
            panels = []
            for d in dtypes:
                sel = [r for r in ck
                       if (r["shape"], r["scenario"], r["rounding"], r["state_dtype"]) == (shape, scenario, rnd, d)]
                sel += [r for r in base if r["shape"] == shape and r["state_dtype"] == d
                        and (r["rounding"] == rnd or r["strategy"] == "all_states")]
                series = _series(sel, key)
                if series:
                    panels.append((d, series))
            if not panels:
                continue
            n = len(panels)
            fixed = {**PEER_STYLE, **BASELINE_STYLE}
            labels = sorted({lb for _, series in panels for lb in series if lb not in fixed})
            cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            style = {lb: dict(color=cycle[i % len(cycle)]) for i, lb in enumerate(labels)}
            style.update(fixed)
            fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 1.8, 3.8), squeeze=False, sharey=logy)
            handles = {}
            for ax, (d, series) in zip(axes[0], panels):
                for label, pts in sorted(series.items()):
                    xs, ys = zip(*pts)
                    (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label, **style[label])
                    handles.setdefault(label, line)
                ax.set_xscale("log", base=2)
                if logy:
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(0, 100)
                ax.set_title(f"state {d}")
                ax.set_xlabel("batch")
                ax.grid(True, which="both", alpha=0.3)
            axes[0][0].set_ylabel(ylabel)
            order = labels + [lb for lb in fixed if lb in handles]
            fig.legend([handles[lb] for lb in order if lb in handles], [lb for lb in order if lb in handles],
                       loc="center right", fontsize=7)
            fig.suptitle(f"{card} · {shape} · {scenario} · {rnd.upper()} · T={meta.get('T')} W={meta.get('W')}")
            fig.tight_layout(rect=(0, 0, 1 - 1.6 / (4.2 * n + 1.8), 1))
            path = out_dir / f"{kind}_{shape}_{scenario}_{rnd}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
