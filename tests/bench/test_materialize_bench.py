"""`specssm bench --materialize`: its byte count, case list and the GPU timing hook (`-m gpu`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from specssm.bench import cli
from specssm.bench.cases import parse_shape
from specssm.bench.materialize import fold_bytes


def test_fold_bytes_counts_states_scales_and_ring_rows():
    sh = parse_shape("super_tp8")                          # H 16, P 64, N 128, G 1
    pnat = np.array([0, 5, 16])
    state = 16 * 64 * 128
    ring = 21 * ((16 * 64 + 128) * 2 + 16 * 4)            # 21 ring tokens of x and B (bf16) and dt (fp32)
    assert fold_bytes(sh, pnat, "bf16") == 3 * 2 * state * 2 + ring
    assert fold_bytes(sh, pnat, "int8", layers=2) == 2 * (3 * (2 * state + 2 * 16 * 64 * 4) + ring)
    assert fold_bytes(sh, pnat, "fp32", act_dtype="fp16") == 3 * 2 * state * 4 + ring


def test_cases_default_to_1024_pairs(capsys):
    assert cli.main(["--materialize", "--dry-run", "--dtypes", "bf16,int8", "--rounding", "rn,sr"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 4 and all(line.endswith("batch=1024") for line in lines)
    assert "materialize super_tp8 int8 sr batch=1024" in lines
    assert cli.main(["--materialize", "--dry-run", "--batches", "8,64", "--shapes", "tp1", "--dtypes", "fp32"]) == 0
    assert capsys.readouterr().out.split() == ["materialize", "tp1", "fp32", "rn", "batch=8",
                                               "materialize", "tp1", "fp32", "rn", "batch=64"]
    assert cli.main(["--materialize", "--dry-run", "--shapes", "nope"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert cli.main(["--materialize", "--dtypes", "bf16"]) == 2
    assert "expected a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", ["bf16", "int8"])
def test_gpu_time_materialize_runs(state_dtype):
    """The hook runs and reports consistent figures (no speed is asserted)."""
    from specssm.bench.materialize import time_materialize
    r = time_materialize("super_tp8", batch=64, state_dtype=state_dtype, min_samples=20)
    assert r["kernel_us"] > 0 and r["call_us"] >= r["kernel_us"] and r["floor_us"] > 0
    assert r["samples"] >= 20 and r["bytes"] > 0
