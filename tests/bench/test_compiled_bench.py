"""`specssm bench --compiled`: the model's decode step eager against torch.compile. The CPU smoke mode
(interpreter, tiny model, eager and aot_eager), the case list, the argument errors and the comparison;
the CUDA mode at batch 1 (`-m gpu`)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from specssm.bench import cli, compiled
from specssm.model import SIZES, ModelCache


def table(page: str, state: str) -> dict:
    """The rows of the page's table for one state dtype: {variant label: [timer, cells..., vs eager]}."""
    section = page.split(f"\n## state {state}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")][2:]      # past head and rule
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def micros(cell: str) -> tuple[float, float]:
    """'812.3 (1.00×)' -> (812.3, 1.0)."""
    us, x = cell.split(" (")
    return float(us), float(x.rstrip("×)"))


@pytest.mark.interpreter
def test_cpu_smoke_mode(tmp_path, capsys):
    """Eager and torch.compile(aot_eager) of the tiny model in the interpreter: the page on stdout and in
    --results-md with one row per variant and finite positive times; over the committed steps it ran,
    the compiled step gave eager's logits and cache bit for bit."""
    md = tmp_path / "results" / "compiled.md"
    assert cli.main(["--compiled", "--device", "cpu", "--out", str(tmp_path), "--results-md", str(md)]) == 0
    page = md.read_text()
    assert capsys.readouterr().out == page
    assert "TinyMamba2LM 'tiny'" in page and "Triton interpreter" in page and f"torch {torch.__version__}" in page
    rows = table(page, "fp32")
    assert list(rows) == ["eager", "torch.compile(aot_eager)"]
    for timer, cell, _check in rows.values():
        us, x = micros(cell)
        assert timer == "wall clock" and math.isfinite(us) and us > 0 and math.isfinite(x) and x > 0
    assert rows["eager"][2] == "(reference)" and rows["torch.compile(aot_eager)"][2] == "bitwise"
    data = json.loads((tmp_path / "compiled.json").read_text())
    assert data["meta"]["check"] == 2 and data["meta"]["repeats"] == 2
    eager, comp = data["rows"]
    assert (eager["variant"], comp["variant"]) == ("eager", "compiled") and comp["batch"] == 2
    assert comp["status"] == "ok" and comp["bitwise"] and comp["ints_equal"]
    assert comp["logits_rel_err"] == 0.0 and comp["cache_rel_err"] == 0.0
    assert comp["samples"] == 2 and comp["x_eager"] == pytest.approx(eager["median_us"] / comp["median_us"])


def test_compare_sees_one_bit():
    """The check behind `bitwise`: equal bits (NaNs included) pass; one flipped low bit of a logit or of
    the state, or another pnat, does not, and the errors say where."""
    caches = [ModelCache(SIZES["tiny"], 2, 6) for _ in range(2)]
    logits = torch.randn(2, 6, 256)
    logits[0, 0, 0] = float("nan")
    check = dict(bitwise=True, logits_rel_err=0.0, cache_rel_err=0.0, ints_equal=True)
    compiled.compare(check, logits.clone(), logits, caches[1], caches[0])
    assert check == dict(bitwise=True, logits_rel_err=0.0, cache_rel_err=0.0, ints_equal=True)
    off = logits.clone()
    off.view(torch.int32)[1, 2, 3] ^= 1
    compiled.compare(check, off, logits, caches[1], caches[0])
    assert not check["bitwise"] and 0 < check["logits_rel_err"] < 1e-6 and check["cache_rel_err"] == 0.0
    for c in caches:
        c.ssm.layers[1].state.fill_(2.0)
    caches[1].ssm.layers[1].state.view(-1)[5] = 3.0
    caches[1].ssm.pnat[1] = 3
    compiled.compare(check, logits, logits, caches[1], caches[0])
    assert check["cache_rel_err"] == 0.5 and not check["ints_equal"]


def test_cases_and_argument_errors(capsys):
    assert cli.main(["--compiled", "--dry-run"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 2 * 3 * 4 and "24 cases" in out.err            # fp32,bf16 x 1,8,64 x 4 variants
    assert lines[:4] == [f"compiled large {v} fp32 batch=1" for v in
                         ("eager", "eager, CUDA graph", "torch.compile(inductor)", "torch.compile(reduce-overhead)")]
    assert cli.main(["--compiled", "--dry-run", "--device", "cpu", "--batch", "1,4", "-T", "4"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["compiled tiny eager fp32 batch=1",
                                                        "compiled tiny torch.compile(aot_eager) fp32 batch=1"]
    for argv, message in [(["--device", "cpu"], "--device: only with --compiled"),
                          (["--size", "small", "--repeats", "3"], "--size, --repeats: only with --compiled"),
                          (["--compiled", "--materialize"], "--compiled: not with --materialize"),
                          (["--compiled", "--dtypes", "bf16,fp64"], "--dtypes: expected state dtypes from"),
                          (["--compiled", "--batches", "1,0"], "--batches: expected positive batch sizes, got [1, 0]"),
                          (["--compiled", "--repeats", "0"], "--repeats: expected >= 1, got 0"),
                          (["--compiled", "--T", "0"], "--T: expected >= 1, got 0")]:
        assert cli.main(argv + ["--dry-run"]) == 2, argv
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert cli.main(["--compiled", "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "expected a CUDA device, got none" in err and "--device cpu" in err


@pytest.mark.gpu
def test_gpu_compiled_bench_batch_1(tmp_path):
    """The CUDA mode at batch 1, 2 timed steps: all four variants run and are timed; the commits between
    the checked steps leave every variant's integer tensors equal to eager's, and the reduce-overhead
    step gives the plain inductor step's bits (same kernels, launched from a graph), no graph skipped."""
    md = tmp_path / "compiled.md"
    assert cli.main(["--compiled", "--batches", "1", "--repeats", "2", "--dtypes", "bf16", "--out", str(tmp_path),
                     "--results-md", str(md)]) == 0
    rows = table(md.read_text(), "bf16")
    assert list(rows) == ["eager", "eager, CUDA graph", "torch.compile(inductor)", "torch.compile(reduce-overhead)"]
    for _timer, cell, _check in rows.values():
        us, x = micros(cell)
        assert math.isfinite(us) and us > 0 and math.isfinite(x) and x > 0
    data = {r["variant"]: r for r in json.loads((tmp_path / "compiled.json").read_text())["rows"]}
    assert all(r["status"] == "ok" and r["ints_equal"] and r["samples"] == 2 for r in data.values())
    assert all(r["logits_rel_err"] < 0.05 for r in data.values())           # rounding, not garbage
    assert data["reduce_overhead"]["bitwise_vs_compiled"] and "note" not in data["reduce_overhead"]
