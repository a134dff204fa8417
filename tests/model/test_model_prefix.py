"""The model path's slot operations: ModelCache.fork / export_states / import_states (SSM states plus conv
contexts), TinyMamba2LM.materialize, and prefix caching (`specssm demo --prefix-cache`): a request
restored from another's materialized prefix state decodes the tokens of a cold run."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.model import SIZES, NgramDrafter, TinyMamba2LM
from specssm.model.cache import ModelCache
from specssm.model.prefix import feed, logit_tolerance, run_prefix_cache
from tests.helpers.slots import bits

TINY = SIZES["tiny"]
PROMPT = torch.tensor(list(b"The quick brown fox jumps over the lazy dog. "), dtype=torch.int64)
SUFFIXES = [torch.tensor(list(b"Once upon "), dtype=torch.int64), torch.tensor(list(b"0123"), dtype=torch.int64)]


def _model(ssu="reference"):
    if ssu == "reference":
        return TinyMamba2LM(TINY, seed=3, dtype=torch.float32, ssu="reference", conv="torch")
    return TinyMamba2LM(TINY, seed=3, dtype=torch.float32, ssu="op", conv="triton", precision="exact")


def _all_bits(cache: ModelCache) -> list:
    return [bits(t).clone() for t in cache.tensors()]


def _prefilled(model, T=4):
    cache = model.new_cache(4, T, window=8)
    slots = cache.allocate(2)
    model.prefill(PROMPT[:20], cache, int(slots[0]))
    feed(model, cache, int(slots[0]), PROMPT[20:27], T)             # 7 tokens through steps: pnat > 0
    model.prefill(PROMPT[:9], cache, int(slots[1]))
    return cache, slots


@pytest.mark.parametrize("ssu", ["reference", pytest.param("op", marks=pytest.mark.interpreter)])
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


def test_prefix_cache_run_matches_cold_runs_and_notices_a_broken_restore(monkeypatch):
    """The reference path (fast): restored requests decode their cold runs' tokens with the float64
    reference's logits; a restore that loses the prefix's ring tokens (no fold) or the conv context
    shows in the logits (the tiny model's greedy tokens hardly depend on the state)."""
    model = _model()
    tol = logit_tolerance(torch.float32, torch.float32)
    run = run_prefix_cache(model, PROMPT, SUFFIXES, 12, 4, NgramDrafter, window=8)
    assert run.pnat_before > 0 and run.state_rel_err < 1e-5
    assert run.diffs == [None, None] and run.tokens == run.cold
    assert max(run.logit_rel_err) <= tol
    real = ModelCache.import_states

    def forgetful(self, slots, tensors):
        real(self, slots, tensors)
        for cs in self.conv_states:
            cs[slots.long()] = 0
    with monkeypatch.context() as m:
        m.setattr(ModelCache, "import_states", forgetful)
        broken = run_prefix_cache(model, PROMPT, SUFFIXES, 12, 4, NgramDrafter, window=8)
    assert broken.logit_rel_err[0] <= tol < broken.logit_rel_err[1]
    with monkeypatch.context() as m:
        m.setattr(TinyMamba2LM, "materialize", lambda self, cache, src, dst: cache.ssm.pnat.__setitem__(src.long(), 0))
        broken = run_prefix_cache(model, PROMPT, SUFFIXES, 12, 4, NgramDrafter, window=8)
    assert broken.state_rel_err > 0.1 and min(broken.logit_rel_err) > tol


@pytest.mark.interpreter
def test_demo_prefix_cache(capsys):
    from specssm.model.demo import main
    rc = main(["--prefix-cache", "--size", "tiny", "--tokens", "8", "-T", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for word in ("materialize = Triton kernel", "folded in place", "request A from the prefix cache == its cold run",
                 "request B's logits after its prompt against the float64 reference",
                 "request B from the prefix cache == its cold run", "demo: OK"):
        assert word in out, out
