"""SSMCache.commit: the on-device ring_start/pnat update (docs/design.md, "The closed form"), checked
against a plain Python transcription of it, plus its bad inputs."""
import pytest
import torch

from specssm.cache import SSMCache

PAD = -1


def commit_model(ring_start, pnat, seeds, rows, accepted, lens, W, L):
    """The commit, one row at a time: flushed = pnat + len > W;
    ring_start = (ring_start + pnat) % L if flushed; pnat = acc if flushed else pnat + acc; seed += 1."""
    rs, pn, sd = list(ring_start), list(pnat), list(seeds)
    for b, s in enumerate(rows):
        if s == PAD:
            continue
        if pn[s] + lens[b] > W:
            rs[s] = (rs[s] + pn[s]) % L
            pn[s] = accepted[b]
        else:
            pn[s] = pn[s] + accepted[b]
        sd[s] += 1
    return rs, pn, sd


def random_cache(T, W, num_slots=8, seed=0, strategy="checkpointing", layers=2):
    gen = torch.Generator().manual_seed(seed)
    cache = SSMCache(layers, num_slots, 2, 4, 4, 1, T, W, state_dtype=torch.float32, act_dtype=torch.float32,
                     strategy=strategy)
    cache.allocate(num_slots)
    cache.pnat.copy_(torch.randint(0, max(cache.W, T) + 1, (num_slots,), generator=gen, dtype=torch.int32))
    cache.ring_start.copy_(torch.randint(0, cache.L, (num_slots,), generator=gen, dtype=torch.int32))
    for lc in cache.layers:
        for t in (lc.state, lc.x_cache, lc.B_cache, lc.dt_cache):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen))
    return cache, gen


def random_rows(gen, num_slots, n, p_pad=0.3):
    slots = torch.randperm(num_slots, generator=gen)[:n].tolist()
    rows = []
    for s in slots:
        if torch.rand((), generator=gen) < p_pad:
            rows.append(PAD)
        rows.append(s)
    return rows


def snapshot(cache):
    d = {"ring_start": cache.ring_start.clone(), "pnat": cache.pnat.clone(), "seeds": cache.seeds.clone(),
         "state_index": cache.state_index.clone()}
    for i, lc in enumerate(cache.layers):
        for nm in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            t = getattr(lc, nm)
            if t is not None:
                d[f"{nm}[{i}]"] = t.clone()
    return d


def changed(cache, snap):
    now = snapshot(cache)
    return [k for k in snap if not torch.equal(now[k], snap[k])]


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("T,W", [(1, 16), (4, 16), (6, 16), (16, 16), (4, 8), (4, 0)])
def test_commit_follows_the_design(T, W, validate):
    for seed in range(5):
        cache, gen = random_cache(T, W, seed=seed)
        rows = random_rows(gen, cache.num_slots, 6)
        acc = torch.randint(1, T + 1, (len(rows),), generator=gen, dtype=torch.int32)
        acc[[b for b, s in enumerate(rows) if s == PAD]] = 0          # ignored on padding rows
        want = commit_model(cache.ring_start.tolist(), cache.pnat.tolist(), cache.seeds.tolist(), rows,
                            acc.tolist(), [T] * len(rows), cache.W, cache.L)
        snap = snapshot(cache)
        cache.commit(torch.tensor(rows, dtype=torch.int32), acc, validate=validate)
        assert (cache.ring_start.tolist(), cache.pnat.tolist(), cache.seeds.tolist()) == want
        assert cache.ring_start.dtype == torch.int32 and cache.pnat.dtype == torch.int32
        # the commit moves counters only: states and rings of every layer untouched
        assert set(changed(cache, snap)) <= {"ring_start", "pnat", "seeds"}


def test_flushed_and_kept_rows_side_by_side():
    """pnat = W - T keeps its history, W - T + 1 flushes it (ring_start moves past it)."""
    T, W = 6, 16
    cache, _ = random_cache(T, W, num_slots=3)
    cache.pnat.copy_(torch.tensor([W - T, W - T + 1, 3], dtype=torch.int32))
    cache.ring_start.copy_(torch.tensor([5, cache.L - 2, 0], dtype=torch.int32))
    seeds = cache.seeds.clone()
    cache.commit(torch.tensor([0, 1, PAD], dtype=torch.int32), torch.tensor([2, 4, 6], dtype=torch.int32))
    assert cache.ring_start.tolist() == [5, (cache.L - 2 + W - T + 1) % cache.L, 0]
    assert cache.pnat.tolist() == [W - T + 2, 4, 3]
    assert (cache.seeds - seeds).tolist() == [1, 1, 0]


def test_padding_rows_change_nothing():
    cache, gen = random_cache(4, 16)
    snap = snapshot(cache)
    cache.commit(torch.full((5,), PAD, dtype=torch.int32), torch.tensor([0, 1, 4, 9, -3], dtype=torch.int32))
    assert changed(cache, snap) == []


@pytest.mark.parametrize("T,W", [(6, 16), (16, 16), (4, 0)])
def test_varlen_rows_flush_on_their_own_length(T, W):
    for seed in range(5):
        cache, gen = random_cache(T, W, seed=10 + seed)
        rows = random_rows(gen, cache.num_slots, 7)
        lens = torch.randint(1, T + 1, (len(rows),), generator=gen, dtype=torch.int32)
        acc = (torch.rand(len(rows), generator=gen) * lens).long().to(torch.int32) + 1
        want = commit_model(cache.ring_start.tolist(), cache.pnat.tolist(), cache.seeds.tolist(), rows,
                            acc.tolist(), lens.tolist(), cache.W, cache.L)
        cache.commit(torch.tensor(rows, dtype=torch.int64), acc.long(), num_tokens=lens)
        assert (cache.ring_start.tolist(), cache.pnat.tolist(), cache.seeds.tolist()) == want


def test_varlen_decision_differs_from_padded():
    """A short row next to the boundary keeps its history where a full-length row would flush."""
    T, W = 6, 16
    cache, _ = random_cache(T, W, num_slots=2)
    cache.pnat.copy_(torch.tensor([14, 14], dtype=torch.int32))
    cache.ring_start.copy_(torch.tensor([3, 3], dtype=torch.int32))
    cache.commit(torch.tensor([0, 1]), torch.tensor([2, 2]), num_tokens=torch.tensor([2, 3]))
    assert cache.pnat.tolist() == [16, 2] and cache.ring_start.tolist() == [3, 17]


@pytest.mark.parametrize("strategy,T,W", [("checkpointing", 1, 16), ("checkpointing", 4, 16),
                                          ("checkpointing", 6, 16), ("checkpointing", 16, 16),
                                          ("checkpointing", 6, 4), ("always_write", 4, 16)])
def test_pnat_stays_within_the_ring(strategy, T, W):
    """Over random runs (varlen and padded), pnat <= max(W, T): reads [0, pnat) and appends
    [pnat, pnat + T) never overlap in the ring of L = max(W, T) + T rows."""
    gen = torch.Generator().manual_seed(T * 100 + W)
    cache = SSMCache(1, 6, 1, 1, 1, 1, T, W, strategy=strategy)
    cache.allocate(6)
    seen = set()
    for step in range(300):
        rows = random_rows(gen, 6, 6, p_pad=0.2)
        lens = torch.randint(1, T + 1, (len(rows),), generator=gen)
        varlen = step % 2 == 1
        n = lens if varlen else torch.full((len(rows),), T)
        acc = (torch.rand(len(rows), generator=gen) * n).long() + 1
        cache.commit(torch.tensor(rows), acc, num_tokens=lens if varlen else None)
        assert int(cache.pnat.max()) <= max(cache.W, T)
        assert int(cache.pnat.min()) >= 1 or step == 0
        assert 0 <= int(cache.ring_start.min()) and int(cache.ring_start.max()) < cache.L
        assert max(cache.W, T) + T <= cache.L
        seen.update(cache.pnat.tolist())
    assert max(seen) == max(cache.W, T)                     # the bound is reached, not just respected


def test_all_states_commit_selects_the_accepted_state():
    cache, gen = random_cache(5, 16, strategy="all_states")
    snap = snapshot(cache)
    rows = [3, PAD, 0, 6]
    cache.commit(torch.tensor(rows, dtype=torch.int32), torch.tensor([2, 0, 5, 1], dtype=torch.int32))
    want = snap["state_index"].clone()
    want[3], want[0], want[6] = 1, 4, 0
    assert torch.equal(cache.state_index, want)
    assert (cache.seeds - snap["seeds"]).tolist() == [1, 0, 0, 1, 0, 0, 1, 0]
    assert set(changed(cache, snap)) == {"state_index", "seeds"}


def test_validate_false_gives_the_same_result():
    results = []
    for validate in (True, False):
        cache, gen = random_cache(4, 16, seed=3)
        rows = random_rows(gen, cache.num_slots, 8)
        acc = torch.randint(1, 5, (len(rows),), generator=gen)
        cache.commit(torch.tensor(rows), acc, validate=validate)
        results.append(snapshot(cache))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


# ---- bad inputs --------------------------------------------------------------------------------

META = torch.device("meta")
GOOD = dict(slots=[2, PAD, 0, 5], accepted=[1, 3, 4, 2])


def args(slots=None, accepted=None, **kw):
    d = dict(slots=torch.tensor(GOOD["slots"] if slots is None else slots, dtype=torch.int32),
             accepted=torch.tensor(GOOD["accepted"] if accepted is None else accepted, dtype=torch.int32))
    d.update(kw)
    return d


BAD = {
    "slots: 2-D": (lambda: dict(args(), slots=args()["slots"][None]), "slots"),
    "slots: float": (lambda: dict(args(), slots=args()["slots"].float()), "slots"),
    "slots: meta device": (lambda: dict(args(), slots=args()["slots"].to(META)), "slots"),
    "slots: out of range": (lambda: args(slots=[2, PAD, 8, 5]), "slots"),
    "slots: negative, not pad": (lambda: args(slots=[2, -5, 0, 5]), "slots"),
    "slots: duplicates": (lambda: args(slots=[2, PAD, 2, 5]), "slots"),
    "accepted: wrong length": (lambda: args(accepted=[1, 2, 3]), "accepted"),
    "accepted: float": (lambda: dict(args(), accepted=args()["accepted"].float()), "accepted"),
    "accepted: meta device": (lambda: dict(args(), accepted=args()["accepted"].to(META)), "accepted"),
    "accepted: 0": (lambda: args(accepted=[1, 3, 0, 2]), "accepted"),
    "accepted: T + 1": (lambda: args(accepted=[1, 3, 5, 2]), "accepted"),
    "accepted: more than the row's tokens": (lambda: args(num_tokens=torch.tensor([4, 4, 2, 4]),
                                                          accepted=[1, 3, 3, 2]), "accepted"),
    "num_tokens: wrong length": (lambda: args(num_tokens=torch.tensor([4, 4, 4])), "num_tokens"),
    "num_tokens: float": (lambda: args(num_tokens=torch.tensor([4.0, 4, 4, 4])), "num_tokens"),
    "num_tokens: more than T": (lambda: args(num_tokens=torch.tensor([5, 4, 4, 4]), accepted=[5, 3, 4, 2]),
                                "num_tokens"),
}


@pytest.mark.parametrize("strategy", ["checkpointing", "all_states"])
@pytest.mark.parametrize("what", list(BAD))
def test_commit_bad_input(what, strategy):
    make, name = BAD[what]
    cache, _ = random_cache(4, 16, strategy=strategy)
    snap = snapshot(cache)
    with pytest.raises((ValueError, TypeError)) as e:
        cache.commit(**make())
    assert str(e.value).startswith(f"{name}:"), f"message should name {name!r}: {e.value}"
    assert changed(cache, snap) == []
