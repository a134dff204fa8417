"""SSMCache.fork, export_states and import_states: what they copy, that a forked slot steps exactly like
its source (RN), the export / import round trip bit for bit, and bad arguments rejected before anything
is written."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.cache import SSMCache
from specssm.sim import random_params
from tests.helpers.slots import assert_same_bits, bits, cache_bits, random_cache
from tests.helpers.steps import cache_to, inputs_to

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn]
PER_SLOT = ("state", "state_scale", "x_cache", "B_cache", "dt_cache")


def _slot_tensors(cache, slot):
    out = []
    for lc in cache.layers:
        out += [bits(getattr(lc, f)[slot]) for f in PER_SLOT if getattr(lc, f) is not None]
    return out + [cache.ring_start[slot], cache.pnat[slot]]


@pytest.mark.parametrize("state_dtype", DTYPES)
def test_fork_copies_every_per_slot_tensor_and_gives_fresh_seeds(state_dtype):
    cache, _ = random_cache(slots=8, state_dtype=state_dtype, seed=1)
    before = copy.deepcopy(cache)
    src = torch.tensor([1, 3, 3, 0], dtype=torch.int32)
    dst = torch.tensor([5, 6, 7, cache.pad_slot_id], dtype=torch.int32)      # slot 3 forked twice; a pad pair
    cache.fork(src, dst)
    for s, d in ((1, 5), (3, 6), (3, 7)):
        for a, b in zip(_slot_tensors(cache, d), _slot_tensors(before, s)):
            assert torch.equal(a, b)
    seeds = cache.seeds.tolist()
    assert len({seeds[1], seeds[3], seeds[5], seeds[6], seeds[7]}) == 5, "a fork kept its source's seed"
    for s in (0, 1, 2, 3, 4):                                              # sources and others untouched
        for a, b in zip(_slot_tensors(cache, s), _slot_tensors(before, s)):
            assert torch.equal(a, b)
        assert seeds[s] == int(before.seeds[s])


def _step_inputs(cache, batch, T, seed, device):
    gen = torch.Generator().manual_seed(seed)
    H, P, N, G, act = cache.H, cache.P, cache.N, cache.G, cache.act_dtype
    A, D, dt_bias = random_params(H, P, N, G, gen, torch.float32)
    x = torch.randn(batch, T, H, P, generator=gen).to(act)
    return inputs_to(dict(x=x, dt=torch.randn(batch, T, H, 1, generator=gen).expand(batch, T, H, P), A=A,
                          B=torch.randn(batch, T, G, N, generator=gen).to(act),
                          C=torch.randn(batch, T, G, N, generator=gen).to(act),
                          out=torch.full_like(x, float("nan")), D=D,
                          z=torch.randn(batch, T, H, P, generator=gen).to(act), dt_bias=dt_bias, dt_softplus=True),
                     device)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("launch", ["dynamic", "split"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fork_then_step_equals_step_on_the_original(state_dtype, launch, device):
    """Rows on forked slots give the same outputs, written states and ring appends as on their sources,
    bit for bit (RN): row 0 writes (pnat 14 + 4 > 16), row 1 does not, row 2's ring wraps."""
    from specssm.ops import checkpointing_ssu
    cache, _ = random_cache(layers=1, slots=8, state_dtype=state_dtype, act=torch.bfloat16,
                            pnat=[0, 14, 3, 9, 0, 0, 0, 0], ring_start=[0, 5, 2, 17, 0, 0, 0, 0], seed=2)
    cache = cache_to(cache, device)
    src = torch.tensor([1, 2, 3], dtype=torch.int32, device=device)
    dst = torch.tensor([5, 6, 7], dtype=torch.int32, device=device)
    forked = copy.deepcopy(cache)
    forked.fork(src, dst)
    ins = _step_inputs(cache, 3, 4, 3, device)
    runs = []
    for c, sbi in ((cache, src), (forked, dst)):
        i = dict(ins, out=ins["out"].clone())
        checkpointing_ssu(**i, **c.op_kwargs(0), state_batch_indices=sbi, launch=launch)
        runs.append(i["out"])
    assert torch.equal(bits(runs[0]), bits(runs[1])) and not runs[0].isnan().any()
    for s, d in zip(src.tolist(), dst.tolist()):
        for a, b in zip(_slot_tensors(forked, d), _slot_tensors(cache, s)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("state_dtype", DTYPES)
def test_export_import_round_trip_is_bit_identical(state_dtype):
    src_cache, _ = random_cache(layers=3, slots=6, state_dtype=state_dtype, pnat=[0, 4, 0, 0, 7, 0], seed=4)
    slots = torch.tensor([3, 0, 5], dtype=torch.int64)
    out = src_cache.export_states(slots)
    assert set(out) == ({"state", "state_scale"} if state_dtype in (torch.int8, torch.float8_e4m3fn) else {"state"})
    assert out["state"].shape == (3, 3, 2, 16, 32) and out["state"].dtype == state_dtype
    saved = {k: v.clone() for k, v in out.items()}
    # into another cache, other slots, one of them dirty (history, ring position)
    dst_cache, _ = random_cache(layers=3, slots=5, state_dtype=state_dtype, pnat=[3, 0, 16, 2, 0],
                                ring_start=[1, 2, 3, 4, 5], seed=5)
    before = copy.deepcopy(dst_cache)
    into = torch.tensor([2, 4, 0], dtype=torch.int32)
    dst_cache.import_states(into, out)
    for s, d in zip(slots.tolist(), into.tolist()):
        for layer in range(3):
            a, b = dst_cache.layers[layer], src_cache.layers[layer]
            assert torch.equal(bits(a.state[d]), bits(b.state[s]))
            if a.state_scale is not None:
                assert torch.equal(a.state_scale[d], b.state_scale[s])
        assert int(dst_cache.pnat[d]) == 0 and int(dst_cache.ring_start[d]) == 0
        assert int(dst_cache.seeds[d]) != int(before.seeds[d])
    for s in (1, 3):                                                       # the other slots untouched
        for a, b in zip(_slot_tensors(dst_cache, s), _slot_tensors(before, s)):
            assert torch.equal(a, b)
        assert int(dst_cache.seeds[s]) == int(before.seeds[s])
    for k in out:                                                          # export is a copy
        assert torch.equal(bits(out[k]), bits(saved[k]))


def test_export_needs_materialized_slots():
    cache, _ = random_cache(slots=4, pnat=[0, 5, 0, 0], seed=6)
    before = cache_bits(cache)
    with pytest.raises(ValueError, match=r"^slots: expected materialized slots \(pnat 0\), got slot 1 with pnat 5"):
        cache.export_states(torch.tensor([0, 1]))
    assert_same_bits(before, cache)


def _bad_calls(cache, good):
    S = cache.num_slots
    i32 = torch.int32
    t = torch.tensor
    bad_state = dict(good, state=good["state"][:, :, :1])
    return [
        ("fork", (t([0, 1], dtype=i32), t([2], dtype=i32)), ValueError, r"^dst_slots: expected shape \(2\)"),
        ("fork", (t([0], dtype=torch.float32), t([2], dtype=i32)), TypeError, "^src_slots:"),
        ("fork", (t([0, 1], dtype=i32), t([2, 2], dtype=i32)), ValueError, "^dst_slots: expected distinct"),
        ("fork", (t([0, 2], dtype=i32), t([2, 3], dtype=i32)), ValueError, "^dst_slots: expected no pair to write"),
        ("fork", (t([S], dtype=i32), t([1], dtype=i32)), ValueError,
         rf"^src_slots: expected slot ids in \[0, {S}\), got {S}"),
        ("fork", (t([0], dtype=i32), t([-7], dtype=i32)), ValueError, r"^dst_slots: expected slot ids .* got -7"),
        ("export_states", (t([0, 0]),), ValueError, "^slots: expected distinct"),
        ("export_states", (t([[0]]),), ValueError, "^slots: expected 1 dimensions"),
        ("export_states", (t([S]),), ValueError, "^slots: expected slot ids"),
        ("import_states", (t([1]), good), ValueError, r"^tensors\['state'\]: expected shape \(2, 1, 2, 16, 32\)"),
        ("import_states", (t([1, 2]), dict(good, state=good["state"].float())), TypeError, r"^tensors\['state'\]:"),
        ("import_states", (t([1, 2]), {"state": good["state"]}), ValueError, "^tensors: expected the keys"),
        ("import_states", (t([1, 2]), dict(good, extra=good["state"])), ValueError, "^tensors: expected the keys"),
        ("import_states", (t([1, 2]), bad_state), ValueError, r"^tensors\['state'\]:"),
        ("import_states", (t([1, 2]), dict(good, state_scale=good["state_scale"][:1])), ValueError,
         r"^tensors\['state_scale'\]:"),
        ("import_states", (t([1, 1]), good), ValueError, "^slots: expected distinct"),
        ("import_states", (t([1, -1]), good), ValueError, "^slots: expected slot ids"),
        ("import_states", (t([1, 2]), [good["state"]]), TypeError, "^tensors: expected a dict"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_arguments_raise_and_leave_the_cache_bit_identical(case):
    cache, _ = random_cache(slots=5, state_dtype=torch.int8, pnat=[0, 3, 0, 2, 0], seed=7)
    good = cache.export_states(torch.tensor([0, 2]))
    calls = _bad_calls(cache, good)
    assert len(calls) == 18
    method, args, exc, match = calls[case]
    before = cache_bits(cache)
    with pytest.raises(exc, match=match):
        getattr(cache, method)(*args)
    assert_same_bits(before, cache)


def test_export_import_need_a_ring_strategy():
    c = SSMCache(1, 3, 2, 4, 4, 1, 4, strategy="all_states")
    with pytest.raises(ValueError, match=r"^cache: expected a cache of a ring strategy"):
        c.export_states(torch.tensor([0]))
    c.fork(torch.tensor([0]), torch.tensor([2]))          # all-states: its T states and index are copied
    assert torch.equal(c.layers[0].state[2], c.layers[0].state[0])
