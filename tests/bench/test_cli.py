"""`specssm bench` arguments, case lists and re-rendering of a results.json (no GPU)."""
from __future__ import annotations

import itertools
import json

import pytest

from specssm.bench import cases as cs
from specssm.bench import cli
from specssm.bench.cases import parse_shape


def args_of(*argv):
    return cli.resolve(cli.build_parser().parse_args(list(argv)))


def test_presets_and_explicit_flags():
    a = args_of()
    assert a.batches == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024] and a.launch == ["auto"]
    q = args_of("--quick", "--batches", "4,8")
    assert q.batches == [4, 8] and q.dtypes == ["fp32", "bf16", "int8"] and q.min_samples == 50
    full = args_of("--all")
    assert full.shapes == ["super_tp8", "tp1"] and full.rounding == ["rn", "sr"]
    assert full.launch == ["auto", "split", "dynamic"] and full.no_write_form == ["rectangle", "replay"]


def test_pdl_flag():
    assert args_of().pdl is False and args_of("--quick", "--pdl").pdl is True
    assert cli.main(["--dry-run", "--quick", "--pdl"]) == 0


def test_case_lists():
    quick = cli.make_cases(args_of("--quick"))
    # 3 batches x 3 dtypes x (checkpointing + always-write + all-states)
    assert len(quick) == 27
    full = cli.make_cases(args_of("--all"))
    # per (shape, dtype, batch): checkpointing 2 roundings x (mixed 6 + all_no_write 6 + all_write 3 variants:
    # 3 launches x 2 no-write forms, the form moot when every row writes), always-write 2 roundings, all-states 1
    assert len(full) == 2 * 5 * 11 * (2 * 15 + 2 + 1)
    keys = {tuple(sorted(c.key().items())) for c in full}
    assert len(keys) == len(full)
    # grouped: consecutive cases share (shape, dtype, batch, strategy) runs
    groups = [(c.shape, c.state_dtype, c.batch, c.variant.strategy) for c in full]
    changes = sum(1 for a, b in itertools.pairwise(groups) if a != b)
    assert changes + 1 == 2 * 5 * 11 * 3


def test_dry_run(capsys):
    assert cli.main(["--dry-run", "--quick", "--strategies", "checkpointing", "--launch", "auto,dynamic"]) == 0
    out = capsys.readouterr()
    assert "super_tp8 ckpt/dynamic/rect bf16 rn mixed batch=256" in out.out
    assert "18 cases" in out.err


def test_sweep_runs_each_checkpointing_variant_under_each_override(capsys):
    """The quick loop's --sweep: every checkpointing variant once per override ({} = the tables alone),
    the baselines once; the override is part of the case (label, row key) so rows of a sweep differ."""
    a = args_of("--strategies", "checkpointing,always_write", "--launch", "dynamic,split", "--dtypes", "fp32",
                "--batches", "1", "--sweep", '[{}, {"coef": {"HB": 4}}]', "--timer", "events")
    cases = cli.make_cases(a)
    ck = [c for c in cases if c.variant.strategy == "checkpointing"]
    assert len(ck) == 2 * 2 and len(cases) == len(ck) + 1          # always-write once (RN), no override
    assert {c.variant.config for c in ck} == {"", '{"coef": {"HB": 4}}'}
    assert {c.key()["variant"] for c in ck} == {"ckpt/dynamic/rect", "ckpt/split/rect",
                                                'ckpt/dynamic/rect {"coef": {"HB": 4}}',
                                                'ckpt/split/rect {"coef": {"HB": 4}}'}
    assert all(c.variant.config == "" for c in cases if c.variant.strategy != "checkpointing")
    assert len({tuple(sorted(c.key().items())) for c in cases}) == len(cases)
    assert a.timer == "events" and args_of().timer == "cupti"


@pytest.mark.parametrize("sweep", ['{"coef": {}}', "[]", "[1]", "[{"])
def test_bad_sweep_exits_2_naming_it(sweep, capsys):
    assert cli.main(["--dry-run", "--sweep", sweep]) == 2
    assert "specssm bench: --sweep: expected" in capsys.readouterr().err


def test_the_events_timer_does_not_time_the_seed(peer_dir, capsys):
    assert cli.main(["--dry-run", "--timer", "events", "--peer", f"trtllm={peer_dir}"]) == 2
    assert "specssm bench: --peer: the events timer counts every op" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--dtypes", "fp4"], ["--launch", "warp"], ["--scenarios", "often"],
                                 ["--shapes", "huge"], ["--W", "17"], ["--batches", "0"]])
def test_bad_arguments_exit_2(bad, capsys):
    assert cli.main(["--dry-run", *bad]) == 2
    assert "specssm bench:" in capsys.readouterr().err


def test_custom_shape():
    s = parse_shape("nano:64x64x128x8")
    assert (s.name, s.H, s.P, s.N, s.G) == ("nano", 64, 64, 128, 8)
    assert parse_shape("80x80x128x1").name == "H80P80N128G1"
    with pytest.raises(ValueError, match="G dividing H"):
        parse_shape("x:6x64x128x4")
    with pytest.raises(ValueError, match=r"or \[name:\]HxPxNxG, got '64,64,128,8'"):
        parse_shape("64,64,128,8")
    # in a comma-separated list on the command line
    args = cli.build_parser().parse_args(["--shapes", "super_tp8,nano:64x64x128x8"])
    assert [parse_shape(s).name for s in args.shapes] == ["super_tp8", "nano"]


def test_histogram_file(tmp_path, capsys):
    f = tmp_path / "h.csv"
    f.write_text("accepted,count\n1,5\n2,5\n")
    assert cli.main(["--dry-run", "--quick", "--histogram", str(f)]) == 0
    f.write_text("accepted,count\n0,5\n")
    assert cli.main(["--dry-run", "--quick", "--histogram", str(f)]) == 2


def test_render_writes_every_output(tmp_path, capsys):
    meta = {"card": "NVIDIA H100 80GB HBM3", "copy_bw_GBps": 3000.0, "l2_bytes": 50 * 2**20, "torch": "2.13",
            "triton": "3.6.0", "T": 6, "W": 16, "act_dtype": "bf16", "command": "specssm bench"}
    rows = []
    for batch in (1, 2, 4):
        for strategy, variant, t in (("checkpointing", "ckpt/auto/rect", 3.0), ("always_write", "always-write", 5.0),
                                     ("all_states", "all-states", 9.0)):
            rows.append({"card": meta["card"], "shape": "super_tp8", "T": 6, "W": 16, "act_dtype": "bf16", "z": False,
                         "strategy": strategy, "variant": variant, "state_dtype": "bf16", "rounding": "rn",
                         "scenario": "mixed" if strategy == "checkpointing" else "any", "batch": batch,
                         "status": "ok", "median_us": t * batch ** 0.5, "conv_median_us": t * batch ** 0.5 + 2,
                         "pct_floor": 40.0 + batch})
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": meta, "rows": rows}))
    out = tmp_path / "out"
    md = tmp_path / "results" / "H100.md"
    assert cli.main(["--render", str(src), "--out", str(out), "--results-md", str(md)]) == 0
    for name in ("results.csv", "results.json", "summary.md", "time_super_tp8_mixed_rn.png",
                 "time_conv_super_tp8_mixed_rn.png", "floor_super_tp8_mixed_rn.png"):
        assert (out / name).exists(), name
    text = md.read_text()
    assert "| 4 | 6.00 | ckpt/auto/rect |" in text and "1.67x" in text
    assert "| super_tp8 | ckpt/auto/rect | bf16 | rn | mixed | 1 | 3.00 |" in capsys.readouterr().out


@pytest.fixture
def peer_dir(tmp_path):
    """A folder holding trtllm_replay/ (never imported by a dry run)."""
    pkg = tmp_path / "trtllm_replay"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "replay_selective_state_update.py").write_text("")
    return tmp_path


def test_peer_cases_follow_our_checkpointing_cases(peer_dir):
    cases = cli.make_cases(args_of("--quick", "--batches", "16", "--dtypes", "fp32", "--rounding", "rn,sr",
                                   "--scenarios", "mixed,all_no_write", "--peer", f"trtllm={peer_dir}"))
    got = [(c.variant.label, c.rounding, c.scenario) for c in cases]
    assert got == [("ckpt/auto/rect", "rn", "mixed"), ("ckpt/auto/rect", "sr", "mixed"),
                   ("trtllm", "rn", "mixed"), ("trtllm", "sr", "mixed"),
                   ("ckpt/auto/rect", "rn", "all_no_write"), ("ckpt/auto/rect", "sr", "all_no_write"),
                   ("trtllm", "rn", "all_no_write"), ("trtllm", "sr", "all_no_write"),
                   ("always-write", "rn", "any"), ("always-write", "sr", "any"), ("all-states", "rn", "any")]
    k = cases[2].key()
    assert (k["strategy"], k["variant"], k["launch"], k["no_write_form"]) == ("trtllm", "trtllm", "-", "-")
    # the peer shares the checkpointing cache group: one run of cases per (shape, dtype, batch, cache)
    groups = [cs.cache_strategy(c.variant.strategy) for c in cases]
    assert groups == ["checkpointing"] * 8 + ["always_write"] * 2 + ["all_states"]
    # without our checkpointing strategy the peer still runs (on checkpointing caches)
    only = cli.make_cases(args_of("--quick", "--batches", "16", "--dtypes", "fp32", "--strategies", "all_states",
                                  "--peer", f"trtllm={peer_dir / 'trtllm_replay'}"))
    assert [c.variant.label for c in only] == ["trtllm", "all-states"]
    assert len(cli.make_cases(args_of("--quick"))) == 27         # no --peer: nothing changes


def test_dry_run_lists_the_peer_cases(peer_dir, capsys):
    assert cli.main(["--dry-run", "--quick", "--peer", f"trtllm={peer_dir}"]) == 0
    out = capsys.readouterr()
    assert "super_tp8 trtllm bf16 rn mixed batch=256" in out.out and "36 cases" in out.err


@pytest.mark.parametrize("spec,why", [("trtllm=/no/such/dir", "(no such folder)"), ("flashinfer=.", "unknown peer"),
                                      ("trtllm", "no NAME=")])
def test_bad_peer_exits_2_naming_the_argument(spec, why, capsys):
    assert cli.main(["--dry-run", "--quick", "--peer", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specssm bench: --peer: expected 'trtllm=PATH'") and f"got {spec!r}" in err and why in err


def test_render_with_the_seed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from specssm.bench import plots
    meta = {"card": "NVIDIA H200", "copy_bw_GBps": 4000.0, "T": 6, "W": 16, "act_dtype": "bf16"}
    rows = [{"card": "NVIDIA H200", "shape": "super_tp8", "H": 16, "P": 64, "N": 128, "G": 1, "T": 6, "W": 16,
             "act_dtype": "bf16", "z": False, "strategy": strategy, "variant": variant, "state_dtype": "bf16",
             "rounding": "rn", "scenario": "mixed", "batch": batch, "status": "ok", "median_us": t * batch,
             "pct_floor": 50.0}
            for batch in (1, 8) for strategy, variant, t in (("checkpointing", "ckpt/auto/rect", 2.0),
                                                              ("trtllm", "trtllm", 3.0))]
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"meta": meta, "rows": rows}))
    out = tmp_path / "out"
    assert cli.main(["--render", str(src), "--out", str(out)]) == 0
    assert "| 8 | 16.00 | ckpt/auto/rect | -–- | - | - | - | - | 24.00 | 1.50x |" in (out / "summary.md").read_text()
    back = json.loads((out / "results.json").read_text())["rows"]
    assert [r["speedup_vs_seed"] for r in back] == [1.5, None, 1.5, None]
    captured, series = {}, plots._series

    def spy(sel, key):
        captured.setdefault(key, []).append(series(sel, key))
        return captured[key][-1]
    monkeypatch.setattr(plots, "_series", spy)
    assert plots.plot_all(back, meta, tmp_path / "png")
    assert captured["median_us"][0]["trtllm"] == [(1, 3.0), (8, 24.0)]      # the seed's line in the time plot
