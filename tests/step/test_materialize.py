"""materialize against the float64 reference: the destination's checkpoint equals the source's implied
state (or its first k tokens folded) within the state dtype's rounding, for every state dtype, every
pnat 0..W, ring wrap-around, src == dst, padding pairs; same bits on every run (SR included); bad
arguments rejected before anything is written; the no-sync path drops and records bad pairs. CPU
interpreter at small shapes, and `-m gpu` at real ones."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.reference import fold_slot, materialize_ref
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state
from specssm.step.materialize import materialize
from tests.helpers.slots import assert_same_bits, bits, cache_bits, grid_step, poison_slots, random_cache
from tests.helpers.steps import cache_to

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn]
GPU = pytest.param("cuda", marks=pytest.mark.gpu)


def _stored(cache, layer, slot):
    lc = cache.layers[layer]
    return decode_state(lc.state[slot].cpu(), None if lc.state_scale is None else lc.state_scale[slot].cpu())


def _fold_magnitude(cache, layer, slot, A_h, k):
    """exp(Λ)·|S| + Σ_k |w_k·x_k|·|B_k| (float64): what the fold's fp32 rounding errors scale with."""
    lc = cache.layers[layer]
    rows = [(int(cache.ring_start[slot]) + j) % cache.L for j in range(k)]
    S = decode_state(lc.state[slot], None if lc.state_scale is None else lc.state_scale[slot])
    x = lc.x_cache[slot][:, rows].transpose(0, 1).double().abs()
    dt = lc.dt_cache[slot][:, rows].transpose(0, 1).double()
    B = lc.B_cache[slot][:, rows].transpose(0, 1).double().abs()
    return rec.fold(S.abs(), x, dt, A_h, B)      # A < 0: the weights exp(Λ - c_k)·dt_k are positive


def check_stored(got_cache, before, pairs, A, k=None, rounding="rn"):
    """Every destination's checkpoint within the state dtype's rounding of the float64 fold of its
    source's first k tokens (k None: `implied_state`, the slot's true state), every layer."""
    sd = before.state_dtype
    # fp32 errors of the fold: 16-bit activations enter as a (hi, lo) pair, which the interpreter's
    # truncating casts leave good to ~2^-16 relative; fp32 activations to a few ulps
    rel = 4e-5 if before.act_dtype != torch.float32 else 2e-6
    # RN: half a grid step at the larger magnitude; SR and fp8 (the interpreter's float-to-fp8 cast
    # mis-rounds across powers of two) one step
    half = 1.0 if rounding == "sr" or sd == torch.float8_e4m3fn else 0.5
    for i, (s, d) in enumerate(pairs):
        kk = int(before.pnat[s]) if k is None else (k if isinstance(k, int) else int(k[i]))
        for layer in range(before.num_layers):
            if k is None:
                want = before.implied_state(layer, s, A[layer])
            else:
                want = fold_slot(before, layer, s, A[layer], kk)
            got = _stored(got_cache, layer, d)
            lc = got_cache.layers[layer]
            scale = None if lc.state_scale is None else lc.state_scale[d].cpu().double()[..., None]
            if scale is not None:
                assert bool(torch.isfinite(scale).all() and (scale > 0).all()), f"pair {i}: bad row scales"
            step = grid_step(torch.maximum(got.abs(), want.abs()), sd, scale)
            slack = rel * _fold_magnitude(before, layer, s, A[layer], kk).amax(dim=-1, keepdim=True)
            bad = (got - want).abs() > half * step * 1.001 + slack
            if bool(bad.any()):
                j = tuple(int(v) for v in bad.nonzero()[0])
                raise AssertionError(f"pair {i} ({s} -> {d}, k={kk}) layer {layer}: {int(bad.sum())} elements off; "
                                     f"first at {j}: got {float(got[j])!r} want {float(want[j])!r} "
                                     f"step {float(step[j])!r}")


def check_metadata(cache, before, pairs, k=None):
    for i, (s, d) in enumerate(pairs):
        kk = int(before.pnat[s]) if k is None else (k if isinstance(k, int) else int(k[i]))
        assert int(cache.pnat[d]) == 0
        assert int(cache.ring_start[d]) == (int(before.ring_start[s]) + kk) % before.L
        assert int(cache.seeds[d]) == int(before.seeds[d]) + 1


def check_untouched(cache, before, slots):
    """Every per-slot tensor of `slots` bit-identical to before."""
    idx = torch.tensor(sorted(slots), dtype=torch.int64)
    for lc, l0 in zip(cache.layers, before.layers):
        for f in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            if getattr(lc, f) is not None:
                assert torch.equal(bits(getattr(lc, f).cpu()[idx]), bits(getattr(l0, f)[idx])), f"{f} changed"
    for f in ("pnat", "ring_start", "seeds"):
        assert torch.equal(getattr(cache, f).cpu()[idx], getattr(before, f)[idx]), f"{f} changed"


def _every_pnat_case(state_dtype, act, W=16, T=4, **shape):
    """Sources 0..W with pnat = 0..W (some rings wrapping), destinations W+1..2W+1 (poisoned), one pad."""
    n = W + 1
    L = max(W, T) + T
    ring_start = [(L - 1 - (3 * s) % L) for s in range(n)] + [0] * n       # many wrap: L-1, L-4, ...
    cache, A = random_cache(slots=2 * n, W=W, T=T, state_dtype=state_dtype, act=act,
                            pnat=list(range(n)) + [0] * n, ring_start=ring_start, seed=W + n, **shape)
    poison_slots(cache, range(n, 2 * n))
    src = list(range(n)) + [3]
    dst = list(range(n, 2 * n)) + [cache.pad_slot_id]
    return cache, A, src, dst


@pytest.mark.parametrize("state_dtype", DTYPES)
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", ["cpu", GPU])
def test_every_pnat_every_dtype(state_dtype, act, device):
    cache, A, src, dst = _every_pnat_case(state_dtype, act)
    before = copy.deepcopy(cache)
    c = cache_to(cache, device)
    materialize(c, torch.tensor(src, device=device), torch.tensor(dst, dtype=torch.int32, device=device),
                [a.to(device) for a in A])
    c = cache_to(c, "cpu")
    pairs = list(zip(src, dst))[:-1]
    check_stored(c, before, pairs, A)
    check_metadata(c, before, pairs)
    check_untouched(c, before, src)                       # sources (and the pad pair's) untouched


@pytest.mark.parametrize("state_dtype", DTYPES)
def test_in_place_is_an_early_flush(state_dtype):
    """src == dst: the slot keeps its true state (within rounding), now with an empty history."""
    cache, A = random_cache(slots=6, state_dtype=state_dtype, pnat=[16, 0, 7, 12, 3, 1],
                            ring_start=[19, 4, 15, 0, 18, 2], seed=11)
    before = copy.deepcopy(cache)
    slots = torch.tensor([0, 2, 3, 1, 5], dtype=torch.int32)
    materialize(cache, slots, slots, A)
    pairs = [(s, s) for s in slots.tolist()]
    check_stored(cache, before, pairs, A)
    check_metadata(cache, before, pairs)
    check_untouched(cache, before, [4])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("how", ["tensor", "int"])
def test_fold_the_first_k_tokens(state_dtype, how):
    """k < pnat: the destination holds the state after the source's first k ring tokens, which the
    token-by-token recurrence confirms independently of the closed-form fold."""
    cache, A = random_cache(slots=8, state_dtype=state_dtype, pnat=[16, 9, 5, 3, 0, 0, 0, 0],
                            ring_start=[10, 19, 0, 7, 0, 0, 0, 0], seed=12)
    before = copy.deepcopy(cache)
    src, dst = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    k = torch.tensor([7, 9, 0, 2], dtype=torch.int32) if how == "tensor" else 3
    materialize(cache, src, dst, A, k=k)
    pairs = list(zip(src.tolist(), dst.tolist()))
    check_stored(cache, before, pairs, A, k=k)
    check_metadata(cache, before, pairs, k=k)
    # fold_slot (what check_stored compared with) against the recurrence, token by token
    lc, s, kk = before.layers[1], 1, (int(k[1]) if how == "tensor" else 3)
    rows = [(int(before.ring_start[s]) + j) % before.L for j in range(kk)]
    S = decode_state(lc.state[s], lc.state_scale[s] if lc.state_scale is not None else None)
    h = S
    for r in rows:
        dA = torch.exp(A[1].double() * lc.dt_cache[s][:, r].double())
        xb = lc.x_cache[s][:, r].double()[:, :, None] * lc.B_cache[s][:, r].double().repeat_interleave(
            before.H // before.G, 0)[:, None, :]
        h = dA[:, None, None] * h + lc.dt_cache[s][:, r].double()[:, None, None] * xb
    assert torch.allclose(fold_slot(before, 1, s, A[1], kk), h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("device", ["cpu", GPU])
def test_sr_uses_the_destination_seed_and_repeats_its_bits(state_dtype, device):
    cache, A = random_cache(slots=8, state_dtype=state_dtype, pnat=[16, 9, 5, 12, 0, 0, 0, 0], seed=13)
    before = copy.deepcopy(cache)
    src = torch.tensor([0, 1, 2, 3], device=device)
    dst = torch.tensor([4, 5, 6, 3], device=device)
    runs = []
    for rounding in ("sr", "sr", "rn"):
        c = cache_to(cache, device)
        materialize(c, src, dst, [a.to(device) for a in A], rounding=rounding)
        runs.append(cache_to(c, "cpu"))
    pairs = list(zip(src.tolist(), dst.tolist()))
    check_stored(runs[0], before, pairs, A, rounding="sr")
    check_metadata(runs[0], before, pairs)
    d = dst.tolist()
    for layer in range(cache.num_layers):
        a, b, rn = (r.layers[layer] for r in runs)
        assert torch.equal(bits(a.state), bits(b.state)), "SR: another run, other bits"
        if a.state_scale is not None:
            assert torch.equal(a.state_scale, b.state_scale)
        assert not torch.equal(bits(a.state[d]), bits(rn.state[d])), "SR rounded like RN everywhere"
    # another seed, other bits
    c = cache_to(cache, device)
    c.seeds[5] += 1
    materialize(c, src, dst, [a.to(device) for a in A], rounding="sr")
    c = cache_to(c, "cpu")
    assert not torch.equal(bits(c.layers[0].state[5]), bits(runs[0].layers[0].state[5]))
    assert torch.equal(bits(c.layers[0].state[4]), bits(runs[0].layers[0].state[4]))


@pytest.mark.parametrize("H,P,N,G", [(4, 80, 48, 2), (4, 16, 16, 4)])
def test_shapes(H, P, N, G):
    """P not a power of two (two state-row tiles, the last one partial), N padded, groups."""
    cache, A = random_cache(layers=1, slots=6, H=H, P=P, N=N, G=G, state_dtype=torch.int8,
                            pnat=[14, 5, 0, 0, 16, 0], seed=P + N)
    before = copy.deepcopy(cache)
    poison_slots(cache, [2, 3, 5])
    materialize(cache, torch.tensor([0, 1, 4]), torch.tensor([2, 3, 5]), A)
    check_stored(cache, before, [(0, 2), (1, 3), (4, 5)], A)


def test_a_step_after_materialize_matches_the_reference_step():
    """The destination is a valid slot of the contract: a step on it (write and no-write rows) equals the
    float64 reference's step on the same cache."""
    from specssm.ops import checkpointing_ssu
    from specssm.reference import checkpointing_ssu_ref
    from tests.helpers.compare import run_and_compare
    from tests.helpers.steps import make_step
    cache, ins = make_step(batch=3, slots=6, T=4, act=torch.float32, pnat=[14, 9, 5], seed=14)
    sbi = ins["state_batch_indices"]
    materialize(cache, sbi[:2], sbi[:2], [ins["A"]])       # two rows flushed early, one not
    cache.pnat[int(sbi[1])] = 13                          # and one refilled: writes this step
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="split")


def test_multi_layer_uses_each_layers_A_and_a_stacked_A():
    cache, A = random_cache(layers=3, slots=4, pnat=[12, 6, 0, 0], seed=15)
    before = copy.deepcopy(cache)
    c1, c2 = copy.deepcopy(cache), copy.deepcopy(cache)
    materialize(c1, torch.tensor([0, 1]), torch.tensor([2, 3]), A)
    materialize(c2, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.stack(A))
    check_stored(c1, before, [(0, 2), (1, 3)], A)
    assert all(torch.equal(a, b) for a, b in zip(cache_bits(c1), cache_bits(c2)))


def _bad_calls(cache, A):
    t, pad = torch.tensor, cache.pad_slot_id
    return [
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 4])), ValueError, "^dst_slots: expected distinct"),
        (dict(src_slots=t([0, 1]), dst_slots=t([1, 4])), ValueError, "^dst_slots: expected no pair to write"),
        (dict(src_slots=t([0, 9]), dst_slots=t([4, 5])), ValueError, r"^src_slots: expected slot ids in \[0, 8\)"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 8])), ValueError, "^dst_slots: expected slot ids"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, pad - 1])), ValueError, "^dst_slots: expected slot ids"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4])), ValueError, r"^dst_slots: expected shape \(2\)"),
        (dict(src_slots=t([0.0]), dst_slots=t([4])), TypeError, "^src_slots:"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), k=t([3, 10])), ValueError,
         r"^k: expected values in \[0, pnat of the source slot\].*got 10 at pair 1 \(slot 1 has pnat 9\)"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), k=-1), ValueError, "^k: expected values"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), k=t([1])), ValueError, r"^k: expected shape \(2\)"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), A=A[:1]), ValueError, "^A: expected one per-head A per layer"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), A=[A[0], A[1][:1]]), ValueError, r"^A\[1\]: expected shape"),
        (dict(src_slots=t([0, 1]), dst_slots=t([4, 5]), rounding="up"), ValueError, "^rounding:"),
        (dict(src_slots=t([2, 1]), dst_slots=t([4, 5])), ValueError, r"^cache.pnat: expected values in \[0, 16\]"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_arguments_raise_and_leave_the_cache_bit_identical(case):
    cache, A = random_cache(slots=8, state_dtype=torch.int8, pnat=[16, 9, 5, 3, 0, 0, 0, 0], seed=16)
    cache.pnat[2] = 40                                    # out of the contract: a source must not have it
    calls = _bad_calls(cache, A)
    assert len(calls) == 14
    kw, exc, match = calls[case]
    before = cache_bits(cache)
    with pytest.raises(exc, match=match):
        materialize(cache, **{"A": A, **kw})
    with pytest.raises(exc, match=match):                 # the reference checks the same
        materialize_ref(copy.deepcopy(cache), **{"A": A, **kw})
    assert_same_bits(before, cache)


def test_no_validate_drops_and_records_bad_pairs():
    """validate=False: a pair with a bad slot, k or a clashing destination does nothing and is recorded
    (the first by pair index is named); the good pairs are materialized as with validate=True."""
    cache, A = random_cache(slots=8, pnat=[16, 9, 5, 3, 0, 0, 0, 0], seed=17)
    src = torch.tensor([0, 1, 2, 3, 1, 0])
    dst = torch.tensor([4, 5, 99, 6, 5, 3])          # pair 2: bad slot; 4 clashes with 1; 5 writes 3 (a source)
    k = torch.tensor([16, 9, 5, 7, 1, 0])            # pair 3: k > pnat
    good, bad_dst = copy.deepcopy(cache), [5, 6, 3]
    materialize(good, torch.tensor([0]), torch.tensor([4]), A)
    before = copy.deepcopy(cache)
    materialize(cache, src, dst, A, k=k, validate=False)
    assert torch.equal(bits(cache.layers[0].state[4]), bits(good.layers[0].state[4]))
    check_untouched(cache, before, [0, 1, 2, 3] + bad_dst + [7])
    with pytest.raises(ValueError, match=r"^dst_slots: row 1 of a step, commit or materialize .* had 5"):
        cache.raise_if_faulted()
    cache.raise_if_faulted()                              # cleared


# one bad pair (index 1) beside a good one (index 0: slot 0 -> 4): (src, dst, k, setup, error)
BAD_PAIRS = {
    "dst out of the pool": ([0, 1], [4, 8], None, None, r"^dst_slots: row 1 .* had 8"),
    "src out of the pool": ([0, -3], [4, 5], None, None, r"^src_slots: row 1 .* had -3"),
    "src pnat": ([0, 1], [4, 5], None, ("pnat", 1, 40), r"^prev_num_accepted_tokens: row 1 .* had 40"),
    "src ring_start": ([0, 1], [4, 5], None, ("ring_start", 1, 99), r"^ring_start: row 1 .* had 99"),
    "k above pnat": ([0, 1], [4, 5], [16, 10], None, r"^k: row 1 .* had 10"),
    "dst is a source": ([0, 2], [4, 0], None, None, r"^dst_slots: row 1 .* had 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_PAIRS))
def test_no_validate_records_each_field(case):
    """validate=False: each check of the pairs launch drops its pair and records the field and value;
    the good pair beside it is materialized, every other slot keeps its bits."""
    src, dst, k, setup, error = BAD_PAIRS[case]
    cache, A = random_cache(slots=8, pnat=[16, 9, 5, 3, 0, 0, 0, 0], seed=23)
    if setup is not None:
        getattr(cache, setup[0])[setup[1]] = setup[2]
    good = copy.deepcopy(cache)
    materialize(good, torch.tensor([0]), torch.tensor([4]), A, k=None if k is None else k[0])
    before = copy.deepcopy(cache)
    materialize(cache, torch.tensor(src), torch.tensor(dst), A, k=None if k is None else torch.tensor(k),
                validate=False)
    assert torch.equal(bits(cache.layers[0].state[4]), bits(good.layers[0].state[4]))
    assert int(cache.pnat[4]) == 0 and int(cache.ring_start[4]) == int(good.ring_start[4])
    check_untouched(cache, before, [0, 1, 2, 3, 5, 6, 7])
    with pytest.raises(ValueError, match=error):
        cache.raise_if_faulted()


def test_no_validate_finds_clashes_across_program_blocks():
    """More pairs than one program of the pairs launch takes: two live pairs 200 apart on one destination
    are both dropped (the first by index is named); a later good pair and the padding around them are as
    with validate=True."""
    from specssm.step.materialize import PAIR_BLOCK
    n = 2 * PAIR_BLOCK + 5
    cache, A = random_cache(slots=8, pnat=[16, 9, 5, 3, 0, 0, 0, 0], seed=24)
    src = torch.zeros(n, dtype=torch.int32)
    dst = torch.full((n,), cache.pad_slot_id, dtype=torch.int32)
    src[3], dst[3] = 0, 4
    src[203], dst[203] = 1, 4
    src[n - 1], dst[n - 1] = 2, 5
    good = copy.deepcopy(cache)
    materialize(good, torch.tensor([2]), torch.tensor([5]), A)
    before = copy.deepcopy(cache)
    materialize(cache, src, dst, A, validate=False)
    assert torch.equal(bits(cache.layers[0].state[5]), bits(good.layers[0].state[5]))
    check_untouched(cache, before, [0, 1, 2, 3, 4, 6, 7])
    with pytest.raises(ValueError, match=r"^dst_slots: row 3 .* had 4"):
        cache.raise_if_faulted()

def test_rejects_other_strategies_and_float64_caches():
    from specssm.cache import SSMCache
    A = [-torch.ones(2)]
    with pytest.raises(ValueError, match=r"^cache: expected a cache of a ring strategy"):
        materialize(SSMCache(1, 2, 2, 16, 16, 1, 4, strategy="all_states"), torch.tensor([0]), torch.tensor([1]), A)
    c = SSMCache(1, 2, 2, 16, 16, 1, 4, state_dtype=torch.float64, act_dtype=torch.float64)
    with pytest.raises(TypeError, match=r"^cache: expected float32 dt_cache"):
        materialize(c, torch.tensor([0]), torch.tensor([1]), A)
    materialize_ref(c, torch.tensor([0]), torch.tensor([1]), A)      # the reference folds float64 caches


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", DTYPES)
def test_gpu_super_tp8_256_pairs(state_dtype):
    """Real shapes (Super TP8), 256 pairs with random pnat and ring positions, against the reference."""
    n = 256
    cache, A = random_cache(layers=1, slots=2 * n, H=16, P=64, N=128, G=1, T=6, state_dtype=state_dtype, seed=18)
    before = copy.deepcopy(cache)
    poison_slots(cache, range(n, 2 * n))
    c = cache_to(cache, "cuda")
    materialize(c, torch.arange(n, device="cuda"), torch.arange(n, 2 * n, device="cuda"), [a.cuda() for a in A])
    c = cache_to(c, "cpu")
    pairs = [(s, s + n) for s in range(0, n, 7)]          # a sample of the pairs against float64
    check_stored(c, before, pairs, A)
    check_metadata(c, before, pairs)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.int8])
def test_gpu_materialize_in_a_cuda_graph(state_dtype):
    """validate=False, captured in a CUDA graph (a prefix-cache save between steps) and replayed: no host
    copy inside the capture, and the replay folds like the reference; a second replay over fresh slots too."""
    n = 64
    cache, A = random_cache(layers=1, slots=4 * n, H=16, P=64, N=128, G=1, T=6, state_dtype=state_dtype, seed=21)
    before = copy.deepcopy(cache)
    c = cache_to(cache, "cuda")
    A_dev = [a.cuda() for a in A]
    src = torch.arange(n, device="cuda")
    dst = torch.arange(2 * n, 3 * n, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):      # a warm-up outside the capture compiles the kernel
        materialize(c, src, dst, A_dev, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    c = cache_to(cache_to(before, "cpu"), "cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        materialize(c, src, dst, A_dev, validate=False)
    assert_same_bits(cache_bits(before), c, "captured, not replayed")      # a capture runs nothing
    graph.replay()
    torch.cuda.synchronize()
    got = cache_to(c, "cpu")
    pairs = [(s, s + 2 * n) for s in range(0, n, 5)]
    check_stored(got, before, pairs, A)
    check_metadata(got, before, pairs)
    # new sources and destinations through the same graph: the slot ids are device tensors it reads
    src.copy_(torch.arange(n, 2 * n, device="cuda"))
    dst.copy_(torch.arange(3 * n, 4 * n, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    got = cache_to(c, "cpu")
    pairs = [(s, s + 2 * n) for s in range(n, 2 * n, 5)]
    check_stored(got, before, pairs, A)
    check_metadata(got, before, pairs)
