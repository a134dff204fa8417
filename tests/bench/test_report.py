"""Speedups, markdown tables, CSV and JSON of result rows."""
from __future__ import annotations

import csv
import io
import json
import math

import pytest

from specssm.bench import report


def row(strategy, variant, median, batch=1, dtype="fp32", rounding="rn", scenario="mixed", **kw):
    r = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.13", "triton": "3.6.0", "date": "2025-01-01T00:00:00+00:00",
         "shape": "super_tp8", "H": 16, "P": 64, "N": 128, "G": 1, "T": 6, "W": 16, "act_dtype": "bf16",
         "z": False, "strategy": strategy, "launch": "auto", "no_write_form": "rectangle", "variant": variant,
         "state_dtype": dtype, "rounding": rounding, "scenario": scenario, "batch": batch,
         "status": "ok", "reason": "", "median_us": median, "pct_floor": 50.0, "write_frac": 0.31}
    if median is not None:
        r.update(p10_us=median * 0.9, p90_us=median * 1.1, floor_us=median / 2)
    r.update(kw)
    return r


def sample_rows():
    return [
        row("checkpointing", "ckpt/auto/rect", 4.0, conv_median_us=6.0, plan_us=2.0),
        row("checkpointing", "ckpt/dynamic/rect", 3.0, launch="dynamic"),
        row("always_write", "always-write", 6.0, scenario="any"),
        row("all_states", "all-states", 12.0, scenario="any", launch="-"),
        row("checkpointing", "ckpt/auto/rect", 10.0, batch=2),
        row("always_write", "always-write", 5.0, batch=2, scenario="any", rounding="sr"),   # other rounding
        row("all_states", "all-states", None, batch=2, scenario="any", status="skipped", reason="rejected"),
    ]


def test_speedups_match_card_shape_dtype_batch_and_rounding():
    rows = report.add_speedups(sample_rows())
    assert rows[0]["speedup_vs_always_write"] == pytest.approx(1.5)
    assert rows[0]["speedup_vs_all_states"] == pytest.approx(3.0)
    assert rows[1]["speedup_vs_always_write"] == pytest.approx(2.0)
    assert rows[2]["speedup_vs_always_write"] is None and rows[2]["speedup_vs_all_states"] == pytest.approx(2.0)
    assert rows[3]["speedup_vs_all_states"] is None and rows[3]["speedup_vs_always_write"] == pytest.approx(0.5)
    # batch 2: the only always-write row has SR rounding and the all-states row was skipped
    assert rows[4]["speedup_vs_always_write"] is None and rows[4]["speedup_vs_all_states"] is None
    assert rows[6]["speedup_vs_always_write"] is None


def test_markdown_table_layout():
    md = report.markdown_table(["batch", "variant", "µs"], [[1, "ckpt/auto/rect", "4.00"], [2, "x", "-"]])
    lines = md.strip().split("\n")
    assert lines[0] == "| batch | variant | µs |"
    assert lines[1] == "| ---: | --- | ---: |"
    assert lines[2] == "| 1 | ckpt/auto/rect | 4.00 |"
    assert lines[3] == "| 2 | x | - |"


def test_fmt():
    assert report.fmt(None) == "-" and report.fmt(float("nan")) == "-"
    assert report.fmt(3) == "3" and report.fmt(3.14159, 2) == "3.14"
    assert report.fmt_x(1.5) == "1.50x" and report.fmt_x(None) == "-"


def test_rows_and_summary_markdown():
    rows = report.add_speedups(sample_rows())
    table = report.rows_table(rows)
    assert ("| super_tp8 | ckpt/auto/rect | fp32 | rn | mixed | 1 | 4.00 | 3.60–4.40 | 6.00 | 2.00 | 1.50x | 3.00x "
            "| 50.0 | ok |") in table
    assert "skipped: rejected" in table
    meta = {"card": "NVIDIA H100 80GB HBM3", "copy_bw_GBps": 3000.0, "l2_bytes": 50 * 2**20, "torch": "2.13",
            "triton": "3.6.0", "T": 6, "W": 16, "act_dtype": "bf16", "command": "specssm bench --quick"}
    md = report.summary_markdown(rows, meta)
    assert md.startswith("# specssm bench — NVIDIA H100 80GB HBM3")
    assert "copy bandwidth **3000 GB/s**" in md
    assert "## super_tp8 · mixed · state fp32 · RN" in md
    # batch 1: the dynamic variant is the best one (3.0 us): 6/3 over always-write, 12/3 over all-states
    assert "| 1 | 3.00 | ckpt/dynamic/rect | 2.70–3.30 | 6.00 | - | 2.00x | 4.00x | 1.50 | 50.0 | 0.31 |" in md
    assert "| batch | ckpt/auto/rect | ckpt/dynamic/rect |" in md
    assert "## Baselines · super_tp8 · state fp32 · RN" in md
    assert "| 1 | 6.00 | - | 50.0 | 12.00 | - | 50.0 |" in md
    assert "## Not measured (1 cases)" in md and "rejected" in md


def test_targets_section_takes_the_worst_value_of_each_batch_range():
    """Per (shape, dtype, rounding) of the mixed scenario: the worst best-variant value over the target's
    batches, met or missed by bound/value (latency: value/bound), 8-bit floor bound 75, latency under
    the byte floor flagged as out of reach."""
    ck = "checkpointing"
    rows = [
        # fp32: x always-write 1.2 at 64 (worst of >= 64), 1.5 at 256; all-states 4.4 / 3.6; floor 90 / 60
        row(ck, "a", 30.0, batch=64, speedup_vs_always_write=1.2, pct_floor=40.0),
        row(ck, "a", 80.0, batch=256, speedup_vs_always_write=1.5, speedup_vs_all_states=4.4, pct_floor=90.0),
        row(ck, "a", 300.0, batch=1024, speedup_vs_always_write=1.6, speedup_vs_all_states=3.6, pct_floor=60.0),
        row(ck, "b", 290.0, batch=1024, speedup_vs_always_write=1.7, speedup_vs_all_states=3.8, pct_floor=61.0),
        row(ck, "a", 3.0, batch=1, floor_us=0.2),
        row(ck, "a", 7.0, batch=8, floor_us=6.0),
        row(ck, "a", 100.0, batch=256, dtype="int8", pct_floor=80.0),
        row(ck, "a", 1.0, batch=256, scenario="all_write", pct_floor=1.0),     # not the mixed scenario
    ]
    md = report.targets_markdown(rows)
    lines = {tuple(c.strip() for c in ln.strip("|").split("|")) for ln in md.splitlines() if ln.startswith("| super")}
    assert ("super_tp8", "fp32", "RN", "× always-write ≥ 1.3 at batch ≥ 64", "1.20 (batch 64)",
            "missed by 1.08×") in lines
    # batch 1024: the best variant is "b" (290 us), so its 3.8x is the one that counts
    assert ("super_tp8", "fp32", "RN", "× all-states ≥ 4 at batch ≥ 256", "3.80 (batch 1024)",
            "missed by 1.05×") in lines
    assert ("super_tp8", "fp32", "RN", "% floor ≥ 92 at batch ≥ 256", "61.00 (batch 1024)", "missed by 1.51×") in lines
    assert ("super_tp8", "fp32", "RN", "batch 1 ≤ 3.5 µs", "3.00 µs", "met") in lines
    assert ("super_tp8", "fp32", "RN", "batch 8 ≤ 5.0 µs", "7.00 µs",
            "missed by 1.40× (the byte floor alone is 6.00 µs: out of reach on this card)") in lines
    assert ("super_tp8", "int8", "RN", "% floor ≥ 75 at batch ≥ 256", "80.00 (batch 256)", "met") in lines
    assert not any(ln[1] == "int8" and "92" in ln[3] for ln in lines)
    assert "docs/performance.md" in md
    assert report.targets_markdown([row("always_write", "always-write", 6.0, scenario="any")]) == ""
    meta = {"card": "x", "T": 6, "W": 16}
    assert "## Against the targets" in report.summary_markdown(rows, meta)


def test_csv_has_fixed_columns_and_blank_missing_values():
    rows = report.add_speedups(sample_rows())
    rows[0]["mean_pnat"] = float("nan")
    text = report.csv_text(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0].keys()) == report.CSV_COLUMNS
    assert parsed[0]["card"] == "NVIDIA H100 80GB HBM3" and parsed[0]["triton"] == "3.6.0"
    assert parsed[0]["median_us"] == "4" and parsed[0]["speedup_vs_always_write"] == "1.5"
    assert parsed[0]["mean_pnat"] == "" and parsed[6]["median_us"] == ""


def test_json_round_trip_turns_nan_into_null(tmp_path):
    rows = sample_rows()
    rows[0]["mean_pnat"] = float("nan")
    meta = {"card": "x", "histogram": {1: 2}}
    report.write_json(rows, meta, tmp_path / "r.json")
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["rows"][0]["mean_pnat"] is None and raw["meta"]["histogram"] == {"1": 2}
    back, m = report.read_json(tmp_path / "r.json")
    assert back[1]["median_us"] == 3.0 and m["card"] == "x"
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="rows"):
        report.read_json(tmp_path / "bad.json")


def test_row_identity_ignores_results():
    a, b = row("checkpointing", "v", 1.0), row("checkpointing", "v", 2.0, date="other")
    assert report.row_id(a) == report.row_id(b)
    assert report.row_id(a) != report.row_id(row("checkpointing", "v", 1.0, batch=4))
    # a --pdl row is another measurement; rows from before the field read as pdl = false
    assert report.row_id(row("checkpointing", "v", 1.0, pdl=True)) != report.row_id(a)
    assert report.row_id(row("checkpointing", "v", 1.0, pdl=False)) == report.row_id(a)
    # so is a row under a tuning override (--sweep) or timed by the events timer; older rows had neither
    assert report.row_id(row("checkpointing", "v", 1.0, config='{"coef": {"HB": 4}}')) != report.row_id(a)
    assert report.row_id(row("checkpointing", "v", 1.0, timer="events")) != report.row_id(a)
    assert report.row_id(row("checkpointing", "v", 1.0, config="", timer="cupti")) == report.row_id(a)


def test_kernels_table():
    k = {"kernel": "main_kernel", "regs": 168, "spills": 0, "shared": 66560, "warps": 4, "key": "x" * 300}
    table = report.kernels_table([k])
    assert table.splitlines()[0] == "| kernel | regs | spills | shared B | warps | specialization (end) |"
    assert table.splitlines()[2] == "| main_kernel | 168 | 0 | 66560 | 4 | " + "x" * 120 + " |"
    assert report.kernels_table([]) == "no step kernel was compiled in this run\n"


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                       ("NVIDIA A100-SXM4-80GB", "A100"),
                                       ("NVIDIA GeForce RTX 4090", "GeForce-RTX-4090")])
def test_card_slug(name, slug):
    assert report.card_slug(name) == slug


def test_progress_line():
    from specssm.bench.cases import Case, Shape, Variant
    buf = io.StringIO()
    p = report.Progress(2, stream=buf)
    c = Case(Shape("super_tp8", 16, 64, 128, 1), Variant("checkpointing"), "fp32", "rn", "mixed", 8, 6, 16)
    p.update(c, {"status": "ok", "median_us": 4.25, "pct_floor": 61.0})
    p.update(c, {"status": "skipped", "reason": "rejected"})
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[1/2") and "ckpt/auto/rect fp32 rn mixed b=8:      4.25 us 61.0% floor" in lines[0]
    assert lines[1].endswith("skipped: rejected")
    assert not math.isnan(p.t0)


def seed_rows():
    """Our checkpointing rows and the seed's (strategy trtllm) in one run; the seed's rows carry no launch."""
    seed = {"launch": "-", "no_write_form": "-"}
    return [
        row("checkpointing", "ckpt/auto/rect", 4.0),
        row("checkpointing", "ckpt/dynamic/rect", 3.0, launch="dynamic"),
        row("trtllm", "trtllm", 6.0, **seed),
        row("always_write", "always-write", 6.0, scenario="any"),
        # batch 2: the seed did not run in RN (its SR row must not be taken instead)
        row("checkpointing", "ckpt/auto/rect", 10.0, batch=2),
        row("trtllm", "trtllm", None, batch=2, status="skipped", reason="trtllm rejected it: AssertionError: x",
            **seed),
        row("trtllm", "trtllm", 5.0, batch=2, rounding="sr", **seed),
        # other scenario, other card: never the seed of the mixed rows above
        row("checkpointing", "ckpt/auto/rect", 2.0, scenario="all_no_write"),
        row("trtllm", "trtllm", 1.0, card="NVIDIA H200", **seed),
        # batch 4: only the seed ran
        row("trtllm", "trtllm", 7.0, batch=4, **seed),
    ]


def test_seed_speedup_is_seed_median_over_ours_for_the_same_case():
    rows = report.add_speedups(seed_rows())
    assert report.has_seed(rows) and not report.has_seed(sample_rows())
    got = [r["speedup_vs_seed"] for r in rows]
    assert got[0] == pytest.approx(6.0 / 4.0) and got[1] == pytest.approx(6.0 / 3.0)
    assert got[2:] == [None] * 8          # no seed row for them, or they are not ours
    # without the seed every row reads None: '-' in the tables, blank in the CSV
    plain = report.add_speedups(sample_rows())
    assert all(r["speedup_vs_seed"] is None for r in plain)
    assert "× seed" not in report.rows_table(plain)
    assert "× seed" not in report.summary_markdown(plain, {"card": "x"})
    assert {r["speedup_vs_seed"] for r in csv.DictReader(io.StringIO(report.csv_text(plain)))} == {""}


def test_seed_columns_in_the_tables_and_csv():
    rows = report.add_speedups(seed_rows())
    table = report.rows_table(rows)
    assert "| × AW | × AS | × seed | % floor |" in table
    assert ("| super_tp8 | ckpt/dynamic/rect | fp32 | rn | mixed | 1 | 3.00 | 2.70–3.30 | - | - | 2.00x | - "
            "| 2.00x |") in table
    md = report.summary_markdown(rows, {"card": "x"})
    assert "| × always-write | × all-states | trtllm µs | × seed | floor µs |" in md and "**trtllm µs / × seed**" in md
    # best variant (dynamic, 3 us) against the seed's 6 us; batch 2: the seed was skipped; batch 4: the seed alone
    assert "| 1 | 3.00 | ckpt/dynamic/rect | 2.70–3.30 | - | - | 2.00x | - | 6.00 | 2.00x | 1.50 | 50.0 | 0.31 |" in md
    assert "| 2 | 10.00 | ckpt/auto/rect | 9.00–11.00 | - | - | - | - | skipped | - | 5.00 | 50.0 | 0.31 |" in md
    assert "| 4 | - | not run | - | - | - | - | - | 7.00 | - | - | - | - |" in md
    assert "trtllm rejected it: AssertionError: x" in md            # under Not measured
    parsed = list(csv.DictReader(io.StringIO(report.csv_text(rows))))
    assert [p["speedup_vs_seed"] for p in parsed[:3]] == ["1.5", "2", ""]
