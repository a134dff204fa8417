"""Bad values rejected by the Triton ops before anything is written (validate=True): the message names
the argument, and every cache tensor and the output stay bit-identical."""
from __future__ import annotations

import pytest
import torch

from specssm.ops import always_write_ssu, checkpointing_ssu
from tests.helpers.compare import cache_bits
from tests.helpers.steps import make_step


def assert_rejected_untouched(op, cache, ins, name, **kw):
    before, out = cache_bits(cache), ins["out"].clone()
    with pytest.raises(ValueError) as e:
        op(**ins, **cache.op_kwargs(0), **kw)
    assert str(e.value).startswith(f"{name}:"), e.value
    after = cache_bits(cache)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert torch.equal(ins["out"].isnan(), out.isnan())          # outputs still all NaN
    return str(e.value)


RING_VALUES = [("prev_num_accepted_tokens", "pnat", lambda c: max(c.W, c.T) + 1),
               ("prev_num_accepted_tokens", "pnat", lambda c: -1),
               ("ring_start", "ring_start", lambda c: c.L), ("ring_start", "ring_start", lambda c: -1)]


OPS = [(checkpointing_ssu, {"launch": "dynamic"}), (checkpointing_ssu, {"launch": "split"}), (always_write_ssu, {})]


def _step(op, **kw):
    strategy = "always_write" if op is always_write_ssu else "checkpointing"
    return make_step(batch=3, T=4, pad_rows=(1,), strategy=strategy, seed=5, **kw)


@pytest.mark.parametrize("name,field,value", RING_VALUES)
@pytest.mark.parametrize("op,kw", OPS)
def test_bad_ring_values_rejected(op, kw, name, field, value):
    cache, ins = _step(op, state_dtype=torch.int8 if field == "pnat" else torch.float32)
    slot = int(ins["state_batch_indices"][2])
    v = value(cache)
    getattr(cache, field)[slot] = v
    msg = assert_rejected_untouched(op, cache, ins, name, **kw)
    assert f"got {v} for slot {slot} (row 2)" in msg


@pytest.mark.parametrize("op,kw", OPS)
def test_ring_values_of_free_slots_are_not_checked(op, kw):
    """Slots outside the step may hold any pnat / ring_start: the step runs."""
    cache, ins = _step(op)
    free = [s for s in range(cache.num_slots) if s not in ins["state_batch_indices"].tolist()]
    cache.pnat[free[0]], cache.ring_start[free[0]] = 10 ** 6, -1
    op(**ins, **cache.op_kwargs(0), **kw)
    assert not ins["out"][[0, 2]].isnan().any()


# ---- a CPU without the Triton interpreter ------------------------------------------------------------

NO_INTERPRETER = r"""
import copy, json, os, sys
import torch
from specssm.ops import all_states_ssu, always_write_ssu, checkpointing_ssu
from specssm.conv import conv1d_update, new_conv_offset, new_conv_state
from tests.helpers.compare import cache_bits
from tests.helpers.steps import make_step
if sys.argv[1] == "late":                          # set after the kernels were defined: too late
    os.environ["TRITON_INTERPRET"] = "1"
res = {}
for name, op, strategy, kw in [("dynamic", checkpointing_ssu, "checkpointing", {"launch": "dynamic"}),
                               ("split", checkpointing_ssu, "checkpointing", {"launch": "split"}),
                               ("always_write", always_write_ssu, "always_write", {}),
                               ("all_states", all_states_ssu, "all_states", {})]:
    cache, ins = make_step(batch=3, T=4, strategy=strategy, seed=1)
    if strategy == "all_states":
        ins = {k: v for k, v in ins.items() if k != "pad_slot_id"}
    before, out = cache_bits(cache), ins["out"].clone()
    try:
        op(**ins, **cache.op_kwargs(0), **kw)
        res[name] = "no error"
    except Exception as e:
        after = cache_bits(cache)
        untouched = all(torch.equal(before[k], after[k]) for k in before) and bool(ins["out"].isnan().all())
        res[name] = [type(e).__name__, str(e), untouched]
conv_state, off = new_conv_state(2, 8, 4, 2, torch.float32, "cpu"), new_conv_offset(2, "cpu")
try:
    conv1d_update(torch.zeros(2, 2, 8), conv_state, off, torch.zeros(8, 4))
    res["conv"] = "no error"
except Exception as e:
    res["conv"] = [type(e).__name__, str(e), bool((conv_state == 0).all())]
print(json.dumps(res))
"""


@pytest.mark.parametrize("when", ["unset", "late"])
def test_cpu_without_the_interpreter_names_the_fix(when):
    """Without TRITON_INTERPRET=1 at import, a CPU call fails in Triton with "0 active drivers" unless
    the entry point catches it: each names the fix, before anything is written."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    r = subprocess.run([sys.executable, "-c", NO_INTERPRETER, when], cwd=root, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name, got in res.items():
        assert got != "no error", f"{name}: ran without the interpreter"
        kind, msg, untouched = got
        assert kind == ("ValueError" if name == "conv" else "RuntimeError"), (name, kind, msg)
        assert "TRITON_INTERPRET=1" in msg and "before triton is imported" in msg and "CUDA" in msg, msg
        assert msg.startswith("xBC:" if name == "conv" else "x:"), msg
        assert untouched, f"{name}: the rejected call wrote"
        if when == "late" and name != "conv":
            assert "was not when the kernels were imported" in msg, msg
