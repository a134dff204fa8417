"""The model path's slot operations: ModelCache.fork / export_states / import_states (SSM states plus conv
contexts) and TinyMamba2LM.materialize."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.model import SIZES, TinyMamba2LM
from specssm.model.cache import ModelCache
from specssm.model.mixer import interpreting
from tests.ops.slot_cases import bits

TINY = SIZES["tiny"]
PROMPT = torch.tensor(list(b"The quick brown fox jumps over the lazy dog. "), dtype=torch.int64)


def _model(ssu="reference"):
    if ssu == "reference":
        return TinyMamba2LM(TINY, seed=3, dtype=torch.float32, ssu="reference", conv="torch")
    return TinyMamba2LM(TINY, seed=3, dtype=torch.float32, ssu="op", conv="triton", precision="exact")


def _all_bits(cache: ModelCache) -> list:
    return [bits(t).clone() for t in cache.tensors()]


def feed(model, cache, slot, tokens, T):
    """Prompt tokens through verify steps of up to T tokens, each accepted whole."""
    slots = torch.tensor([slot], dtype=torch.int32)
    for i in range(0, tokens.numel(), T):
        chunk = tokens[i:i + T]
        model.step(chunk[None], cache, slots)
        cache.commit(slots, torch.tensor([chunk.numel()], dtype=torch.int32), chunk.numel())


def _prefilled(model, T=4):
    cache = model.new_cache(4, T, window=8)
    slots = cache.allocate(2)
    model.prefill(PROMPT[:20], cache, int(slots[0]))
    feed(model, cache, int(slots[0]), PROMPT[20:27], T)             # 7 tokens through steps: pnat > 0
    model.prefill(PROMPT[:9], cache, int(slots[1]))
    return cache, slots


@pytest.mark.parametrize("ssu", ["reference", pytest.param("op", marks=pytest.mark.skipif(
    not interpreting(), reason="the Triton path on CPU needs TRITON_INTERPRET=1"))])
def test_fork_then_step_gives_the_sources_logits(ssu):
    model = _model(ssu)
    cache, slots = _prefilled(model)
    forked = copy.deepcopy(cache)
    dst = torch.tensor([3, 2], dtype=torch.int32)
    forked.fork(slots, dst)
    tokens = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(2))
    want = model.step(tokens, cache, slots)
    got = model.step(tokens, forked, dst)
    assert torch.equal(got, want)
    for a, b in zip(forked.conv_states, cache.conv_states):
        assert torch.equal(a[dst.long()], b[slots.long()])


def test_export_import_round_trip_with_conv_contexts():
    model = _model()
    cache, slots = _prefilled(model)
    a = slots[:1]
    with pytest.raises(ValueError, match=r"^slots: expected materialized slots"):
        cache.export_states(a)
    model.materialize(cache, a, a)
    assert int(cache.ssm.pnat[int(a)]) == 0
    entry = cache.export_states(slots)
    assert set(entry) == {"state", "conv"} and entry["conv"].shape == (2, 2, TINY.d_conv - 1, TINY.conv_dim)
    other = model.new_cache(4, 4, window=8)
    into = torch.tensor([2, 0])
    other.import_states(into, entry)
    again = other.export_states(into)
    for k in entry:
        assert torch.equal(bits(again[k]), bits(entry[k]))
    # the restored slots continue like the originals
    tokens = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.step(tokens, other, into.to(torch.int32)), model.step(tokens, cache, slots))


@pytest.mark.parametrize("bad", ["no conv", "conv shape", "conv dtype", "state shape", "slots"])
def test_import_checks_everything_before_writing(bad):
    model = _model()
    cache, slots = _prefilled(model)
    model.materialize(cache, slots, slots)
    entry = cache.export_states(slots)
    into = torch.tensor([2, 3])
    if bad == "no conv":
        entry.pop("conv")
        match = "^tensors: expected a ModelCache export"
    elif bad == "conv shape":
        entry["conv"] = entry["conv"][:, :1]
        match = r"^tensors\['conv'\]: expected shape"
    elif bad == "conv dtype":
        entry["conv"] = entry["conv"].double()
        match = r"^tensors\['conv'\]: expected dtype"
    elif bad == "state shape":
        entry["state"] = entry["state"][:1]
        match = r"^tensors\['state'\]: expected shape"
    else:
        into = torch.tensor([2, 2])
        match = "^slots: expected distinct"
    before = _all_bits(cache)
    with pytest.raises((ValueError, TypeError), match=match):
        cache.import_states(into, entry)
    assert all(torch.equal(x, y) for x, y in zip(before, _all_bits(cache)))
