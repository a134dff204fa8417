"""Bad values rejected by the Triton ops before anything is written (validate=True): the message names
the argument, and every cache tensor and the output stay bit-identical."""
from __future__ import annotations

import pytest
import torch

from specssm.ops import always_write_ssu, checkpointing_ssu
from tests.ops.checks import state_bits
from tests.ops.helpers import make_step


def cache_bits(cache) -> dict:
    """Every tensor of the cache that a step or a commit may write, as comparable copies."""
    d = {"ring_start": cache.ring_start.clone(), "pnat": cache.pnat.clone(), "seeds": cache.seeds.clone()}
    for i, lc in enumerate(cache.layers):
        for nm in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            t = getattr(lc, nm)
            if t is not None:
                d[f"{nm}[{i}]"] = state_bits(t).clone()
    return d


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
