"""Tensor parallelism: TP=2 (two processes, gloo on CPU) generates the tokens of TP=1, with close logits."""
import math

import numpy as np
import pytest
import torch

from specssm.model import SIZES
from specssm.model.tp import free_port, generate_many, launch


def specs():
    base = dict(cfg=SIZES["small"], seed=7, device="cpu", prompts=[list(b"tensor parallel "), list(b"xyz")],
                max_new_tokens=40, T=4, drafter="ngram", ssu="reference", conv="torch", window=16)
    return [dict(base, dtype="fp64", state_dtype="fp32"), dict(base, dtype="fp32", state_dtype="fp32", T=3)]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_tp2_generates_the_tokens_of_tp1():
    one = launch(generate_many, 1, (specs(),))[0]
    two = launch(generate_many, 2, (specs(),))
    for k, (tol, name) in enumerate([(1e-12, "fp64"), (1e-4, "fp32")]):
        ref = one[k]
        assert two[0][k]["tokens"] == two[1][k]["tokens"] == ref["tokens"], name
        assert ref["mean_accepted"] > 1.0
        for key in ("prefill_logits", "step_logits"):
            for r in range(2):
                got = two[r][k][key]
                assert np.isfinite(got).all()
                err = np.abs(got - ref[key]).max() / np.abs(ref[key]).max()
                assert err < tol, (name, key, r, err)


def test_free_port_is_a_loopback_port():
    p = free_port()
    assert 1024 <= p < 65536


def test_launch_reports_a_failing_rank():
    # math.log(rank, world_size): rank 0 raises "math domain error", rank 1 returns 0.0; a builtin,
    # so the spawned processes need not import this test module
    with pytest.raises(RuntimeError, match="rank 0"):
        launch(math.log, 2)
