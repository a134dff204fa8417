"""SSMCache layout, slots (allocate / free / reset), prefill writes and the implied state."""
import pytest
import torch

from specssm.cache import STRATEGIES, SSMCache
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state

H, P, N, G = 4, 8, 8, 2


@pytest.mark.parametrize("strategy,T,W,L", [("checkpointing", 4, 16, 20), ("checkpointing", 16, 16, 32),
                                            ("checkpointing", 6, 4, 12), ("always_write", 6, 16, 12)])
def test_layout(strategy, T, W, L):
    c = SSMCache(3, 5, H, P, N, G, T, W, state_dtype=torch.int8, act_dtype=torch.bfloat16, strategy=strategy)
    assert (c.L, c.W) == (L, 0 if strategy == "always_write" else W)
    assert len(c.layers) == 3
    lc = c.layers[0]
    assert lc.state.shape == (5, H, P, N) and lc.state.dtype == torch.int8
    assert lc.state_scale.shape == (5, H, P) and lc.state_scale.dtype == torch.float32
    assert lc.x_cache.shape == (5, H, L, P) and lc.x_cache.dtype == torch.bfloat16
    assert lc.B_cache.shape == (5, G, L, N) and lc.B_cache.dtype == torch.bfloat16
    assert lc.dt_cache.shape == (5, H, L) and lc.dt_cache.dtype == torch.float32
    for t in (c.ring_start, c.pnat, c.state_index):
        assert t.shape == (5,) and t.dtype == torch.int32
    assert c.seeds.shape == (5,) and c.seeds.dtype == torch.int64
    kw = c.op_kwargs(1)
    assert kw["state"] is c.layers[1].state and kw["state_scale"] is c.layers[1].state_scale
    assert kw["ring_start"] is c.ring_start and kw["prev_num_accepted_tokens"] is c.pnat
    assert kw["window"] == c.W


def test_all_states_layout():
    c = SSMCache(2, 3, H, P, N, G, 5, strategy="all_states", state_dtype=torch.bfloat16)
    assert c.layers[0].state.shape == (3, 5, H, P, N)
    assert c.layers[0].x_cache is None
    kw = c.op_kwargs(0)
    assert set(kw) == {"states", "state_index"} and kw["state_index"] is c.state_index


def test_float32_state_has_no_scale_and_float64_activations_keep_float64_dt():
    c = SSMCache(1, 2, H, P, N, G, 4, act_dtype=torch.float64, state_dtype=torch.float64)
    assert c.layers[0].state_scale is None and "state_scale" not in c.op_kwargs(0)
    assert c.layers[0].dt_cache.dtype == torch.float64


def test_allocate_resets_slots_and_gives_fresh_seeds():
    c = SSMCache(2, 4, H, P, N, G, 4, state_dtype=torch.int8)
    first = c.allocate(4)
    assert first.dtype == torch.int32 and sorted(first.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"^n:"):
        c.allocate(1)
    seeds0 = c.seeds.clone()
    assert len(set(seeds0.tolist())) == 4
    # dirty slot 2, free it, take it again: reset to an empty history and a zero state
    c.pnat[2], c.ring_start[2] = 7, 11
    for lc in c.layers:
        lc.state[2] = 5
        lc.state_scale[2] = 3.0
    c.free([2])
    again = c.allocate(1)
    assert again.tolist() == [2]
    assert (int(c.pnat[2]), int(c.ring_start[2])) == (0, 0)
    for lc in c.layers:
        assert not lc.state[2].any() and bool((lc.state_scale[2] == 1).all())
    assert int(c.seeds[2]) not in seeds0.tolist()          # a reused slot draws fresh random bits
    assert torch.equal(c.seeds[[0, 1, 3]], seeds0[[0, 1, 3]])


def test_free_rejects_unknown_and_free_slots():
    c = SSMCache(1, 3, H, P, N, G, 4)
    c.allocate(2)
    for bad in ([3], [-1], [2]):
        with pytest.raises(ValueError, match=r"^slots:"):
            c.free(bad)
    c.free([0])
    with pytest.raises(ValueError, match=r"^slots:"):
        c.free([0])


@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32, torch.int8, torch.float8_e4m3fn])
def test_write_state_and_implied_state(state_dtype):
    """Prefill stores the checkpoint with an empty history; later the implied state is the checkpoint
    with its history run through token by token."""
    gen = torch.Generator().manual_seed(0)
    c = SSMCache(2, 3, H, P, N, G, 4, state_dtype=state_dtype, act_dtype=torch.float64)
    slots = c.allocate(3)
    A = -torch.rand(H, dtype=torch.float64, generator=gen) - 0.1
    h = torch.randn(3, H, P, N, dtype=torch.float64, generator=gen)
    c.pnat[1], c.ring_start[1] = 9, 4
    c.write_state(1, slots, h)
    assert c.pnat.tolist() == [0, 0, 0] and c.ring_start.tolist() == [0, 0, 0]
    lc = c.layers[1]
    for s in range(3):
        stored = decode_state(lc.state[s], None if lc.state_scale is None else lc.state_scale[s])
        assert torch.equal(c.implied_state(1, s, A), stored)
        assert float(((stored - h[s]).abs() / h[s].abs().amax(-1, keepdim=True)).max()) <= 2 ** -3
    # a history of 5 tokens that wraps around the ring
    rs, K = c.L - 2, 5
    rows = [(rs + k) % c.L for k in range(K)]
    lc.x_cache[2][:, rows] = torch.randn(H, K, P, dtype=torch.float64, generator=gen)
    lc.B_cache[2][:, rows] = torch.randn(G, K, N, dtype=torch.float64, generator=gen)
    lc.dt_cache[2][:, rows] = torch.rand(H, K, dtype=torch.float64, generator=gen)
    c.pnat[2], c.ring_start[2] = K, rs
    S = decode_state(lc.state[2], None if lc.state_scale is None else lc.state_scale[2])
    Bh = lc.B_cache[2][:, rows].transpose(0, 1)
    _, want = rec.sequential(S, lc.x_cache[2][:, rows].transpose(0, 1), lc.dt_cache[2][:, rows].T, A, Bh, Bh)
    got = c.implied_state(1, 2, A[:, None, None].expand(H, P, N))
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-13


def test_all_states_write_and_implied_state():
    c = SSMCache(1, 2, H, P, N, G, 3, strategy="all_states", state_dtype=torch.float64)
    slots = c.allocate(2)
    h = torch.randn(2, H, P, N, dtype=torch.float64)
    c.state_index[1] = 2
    c.write_state(0, slots, h)
    assert c.state_index.tolist() == [0, 0]
    assert torch.equal(c.implied_state(0, 1, torch.ones(H)), h[1])
    c.layers[0].state[1, 2] = 7.0
    c.state_index[1] = 2
    assert bool((c.implied_state(0, 1, torch.ones(H)) == 7).all())


BAD_WRITE = {
    "layer out of range": (dict(layer=2), "layer"),
    "slot out of range": (dict(slots=torch.tensor([0, 3])), "slots"),
    "padding slot": (dict(slots=torch.tensor([0, -1])), "slots"),
    "duplicate slots": (dict(slots=torch.tensor([1, 1])), "slots"),
    "slots 2-D": (dict(slots=torch.tensor([[0, 1]])), "slots"),
    "h without the slot dim": (dict(h=torch.randn(H, P, N, dtype=torch.float64)), "h"),
    "h of another head_dim": (dict(h=torch.randn(2, H, P + 1, N, dtype=torch.float64)), "h"),
    "h integer": (dict(h=torch.ones(2, H, P, N, dtype=torch.int32)), "h"),
}


@pytest.mark.parametrize("what", list(BAD_WRITE))
def test_write_state_bad_input(what):
    """Rejected before anything is written: states, scales, pnat, ring_start bit-identical."""
    kw, name = BAD_WRITE[what]
    c = SSMCache(2, 3, H, P, N, G, 4, state_dtype=torch.int8, act_dtype=torch.float64)
    c.allocate(3)
    c.pnat[1], c.ring_start[1] = 9, 4
    before = [t.clone() for t in (c.pnat, c.ring_start, c.layers[1].state, c.layers[1].state_scale)]
    args = dict(layer=1, slots=torch.tensor([0, 1]), h=torch.randn(2, H, P, N, dtype=torch.float64))
    args.update(kw)
    with pytest.raises((ValueError, TypeError)) as e:
        c.write_state(**args)
    assert str(e.value).startswith(f"{name}:"), e.value
    after = (c.pnat, c.ring_start, c.layers[1].state, c.layers[1].state_scale)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


BAD_CTOR = {
    "strategy": (dict(strategy="eager"), "strategy"),
    "state dtype": (dict(state_dtype=torch.uint8), "state_dtype"),
    "8-bit all-states": (dict(strategy="all_states", state_dtype=torch.int8), "state_dtype"),
    "groups not dividing heads": (dict(ngroups=3), "ngroups"),
    "no tokens": (dict(max_tokens=0), "max_tokens"),
    "window 17": (dict(window=17), "window"),
    "window -1": (dict(window=-1), "window"),
    "no slots": (dict(num_slots=0), "num_slots"),
}


@pytest.mark.parametrize("what", list(BAD_CTOR))
def test_constructor_bad_input(what):
    kw, name = BAD_CTOR[what]
    args = dict(num_layers=1, num_slots=2, nheads=H, head_dim=P, d_state=N, ngroups=G)
    args.update(kw)
    with pytest.raises((ValueError, TypeError)) as e:
        SSMCache(**args)
    assert str(e.value).startswith(f"{name}:"), e.value


def test_strategies():
    assert STRATEGIES == ("checkpointing", "always_write", "all_states")
