"""`specssm tune` on the CPU: the dry run lists what it would time, a run stopped by its time budget and
resumed ends with the table of an uninterrupted run, a resumed run must keep the search options, the
tuned table loads in config_for, and --install merges it into the shipped table."""
import json

import pytest
import torch

from specssm.step import tables, tuning
from specssm.tune import cli, synthetic
from specssm.tune.log import RunLog

PLAN = ["--states", "bf16", "--batches", "1,64", "--compile-check", "off", "--synthetic"]


class Ticks:
    """A clock that advances one second per reading (the oracle reads it three times per measurement)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def run(out, *extra, noise=0.02, clock=None):
    timer = synthetic.SyntheticTimer(noise=noise, seed=3)
    return cli.main(PLAN + ["--out", str(out), *extra], timer=timer, clock=clock or Ticks()), timer


def entries(out):
    table = json.loads((out / "SYNTH.json").read_text())
    return [{k: v for k, v in e.items() if k != "provenance"} for e in table["entries"]]


def test_dry_run_lists_the_points_of_the_first_sweep(capsys):
    assert cli.main(["--dry-run", "--states", "fp32", "--batches", "1", "--families", "fused", "--T", "12",
                     "--show-pruned"]) == 0
    out = capsys.readouterr().out.splitlines()
    # the ETA's guess: 2 sweeps x (11 + 3 + 1 neighbours + 2 per block) x 2 starts + 4
    assert out[0] == "case float32/rn/T12/W16/H16P64N128G1/b1/fused: 96 valid points, bcd x2, ~88 candidate timings"
    assert out[1] == "  start  fused P64 w4 r128 tn8 ptr  [DEFAULT]"
    assert out[2] == "  block fused BLOCK_P,num_warps: 11 points"
    assert out[3:14] == [f"    fused P{p} w{w} r128 tn8 ptr" for p in (16, 32, 64) for w in (1, 2, 4, 8)
                         if (p, w) != (64, 4)]
    assert out[14:18] == ["  block fused maxnreg: 3 points", "    fused P64 w4 r- tn8 ptr",
                          "    fused P64 w4 r96 tn8 ptr", "    fused P64 w4 r168 tn8 ptr"]
    # T=12 runs a token tile of 16 whatever TN_MIN says: those points are TN_MIN=8's duplicates
    assert out[18:22] == ["  block fused TN_MIN,tma: 1 points (2 pruned)", "    fused P64 w4 r128 tn8 tma",
                          "    - fused P64 w4 r128 tn16 ptr: fused.TN_MIN=16 runs as 8",
                          "    - fused P64 w4 r128 tn16 tma: fused.TN_MIN=16 runs as 8"]
    assert out[-1] == "1 cases, ~88 candidate timings"


def test_dry_run_exhaustive_and_crossover(capsys):
    assert cli.main(["--dry-run", "--states", "int8", "--batches", "8", "--exhaustive-limit", "500"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("case int8/rn/T6/W16/H16P64N128G1/b8/fused: 192 valid points, exhaustive")
    assert out[2] == "  block all: 191 points"
    assert ("case int8/rn/T6/W16/H16P64N128G1/b8/crossover: the fused and split winners head to head "
            "(2 candidates)") in out
    assert out[-1].startswith("3 cases, ")


def test_budget_stop_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run(whole)[0] == 0
    n_whole = len(RunLog(whole / "log.jsonl").requests)
    # 30 ticks: 10 measurements, inside the first case (the fused search at batch 1)
    assert run(stopped, "--time-budget", "30")[0] == cli.EXIT_INCOMPLETE
    assert "time budget reached, 4 cases left; run again with --resume" in capsys.readouterr().err
    first = RunLog(stopped / "log.jsonl")
    assert len(first.requests) == 10 and not first.results
    with open(stopped / "log.jsonl", "a") as f:
        f.write('{"type": "request", "case": "cut off')               # the machine went away mid-write
    code, timer = run(stopped, "--resume")
    assert code == 0 and f"({n_whole - 10} measurements, 10 replayed from the log)" in capsys.readouterr().err
    assert timer.calls == n_whole - 10
    log = RunLog(stopped / "log.jsonl")
    assert len(log.runs) == 2 and len(log.requests) == n_whole
    assert entries(stopped) == entries(whole)
    e = entries(whole)[0]
    assert e["split_min_batch"] == 64 and set(e["batches"]) == {"1", "64"}
    assert e["batches"]["64"]["write"] == synthetic.PREFERRED["write"]


def test_resume_keeps_the_search_options_and_a_fresh_run_keeps_its_log(tmp_path, capsys):
    out = tmp_path / "o"
    assert run(out, "--time-budget", "30")[0] == cli.EXIT_INCOMPLETE
    capsys.readouterr()
    assert run(out, "--resume", "--rounds", "4")[0] == 2
    err = capsys.readouterr().err
    assert "--resume:" in err and "'rounds': 5" in err and "'rounds': 4" in err
    assert run(out)[0] == 2
    assert "log.jsonl exists; pass --resume" in capsys.readouterr().err


def test_tuned_table_loads_in_config_for_and_installs(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert run(out, noise=0.0)[0] == 0
    monkeypatch.setenv(tuning.TABLE_DIR_ENV, str(out))
    monkeypatch.setattr(tuning, "card_name", lambda device: "SYNTH")
    tuning.reload()
    try:
        cfg = tuning.config_for(torch.device("cpu"), 64, 128, torch.bfloat16, batch=100, T=6, W=16,
                                rounding="rn", H=16, G=1)
    finally:
        tuning.reload()
    assert cfg["split_min_batch"] == 64 and cfg["write"] == {**tuning.DEFAULT["write"], **synthetic.PREFERRED["write"]}
    assert cfg["fused"] == {**tuning.DEFAULT["fused"], **synthetic.PREFERRED["fused"]}
    # --install merges into <TABLE_DIR>/<card>.json, keeping entries of other keys
    shipped = tmp_path / "configs"
    shipped.mkdir()
    other = {"state": "int8", "rounding": "rn", "T": 6, "W": 16, "H": 16, "P": 64, "N": 128, "G": 1,
             "batches": {"1": {"fused": {"maxnreg": 96}}}}
    prov = dict.fromkeys(tables.PROVENANCE_FIELDS, "old")
    (shipped / "SYNTH.json").write_text(tables.dumps({"schema": 2, "card": "SYNTH", "provenance": prov,
                                                      "entries": [other]}))
    monkeypatch.setattr(tuning, "TABLE_DIR", shipped)
    assert run(out, "--resume", "--install", noise=0.0)[0] == 0
    merged = tuning.read_table(shipped / "SYNTH.json")
    assert [e["state"] for e in merged["entries"]] == ["bfloat16", "int8"]
    assert merged["entries"][1]["provenance"] == prov and merged["provenance"]["command"].startswith("specssm tune")


@pytest.mark.parametrize("argv,what", [
    (["--states", "fp64"], "--states: expected values from"),
    (["--families", "all"], "--families: expected values from"),
    (["--T", "17"], "--T / --W: expected 1 <= T <= 16"),
    (["--shapes", "16x64x128x3"], "--shapes: expected positive sizes with G dividing H"),
    (["--shapes", "16,64,128,1"], "--shapes: expected one of ['super_tp8', 'tp1'] or [name:]HxPxNxG, got '16'"),
])
def test_bad_selections_are_named(argv, what, capsys):
    assert cli.main(["--dry-run"] + argv) == 2
    assert what in capsys.readouterr().err


class FailsOnce(synthetic.SyntheticTimer):
    """The synthetic timer, except that its 5th request fails as a lost profiler trace would."""

    def time(self, *a, **k):
        if self.calls == 4 and not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("trace: expected 64 marked steps, got 63")
        return super().time(*a, **k)


def test_a_failed_measurement_keeps_the_log(tmp_path, capsys):
    out = tmp_path / "o"
    timer = FailsOnce(noise=0.02, seed=3)
    assert cli.main(PLAN + ["--out", str(out)], timer=timer, clock=Ticks()) == 1
    assert "got 63; the log is kept, run again with --resume" in capsys.readouterr().err
    assert len(RunLog(out / "log.jsonl").requests) == 4
    assert cli.main(PLAN + ["--out", str(out), "--resume"], timer=timer, clock=Ticks()) == 0
    whole = tmp_path / "whole"
    assert run(whole)[0] == 0
    assert entries(out) == entries(whole)
