"""checkpointing_ssu and the baselines against the float64 reference, on the CPU interpreter
(small shapes) and on a GPU (`-m gpu`, real shapes)."""
from __future__ import annotations

import pytest
import torch

from specssm.ops import all_states_ssu, always_write_ssu, checkpointing_ssu
from specssm.reference import all_states_ssu_ref, always_write_ssu_ref, checkpointing_ssu_ref
from tests.helpers.compare import run_and_compare, state_bits
from tests.helpers.steps import make_step


def _same_values(a, b):
    """Equal values, NaN positions included (NaN payloads may differ)."""
    return torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan())


def _count_descriptors(monkeypatch):
    """A list that grows by one for every TMA descriptor the step launcher makes."""
    from specssm.step import launch
    made, real = [], launch.TensorDescriptor
    monkeypatch.setattr(launch, "TensorDescriptor", lambda *a, **k: made.append(1) or real(*a, **k))
    return made

# (launch, no_write_form)
MODES = [("dynamic", "rectangle"), ("dynamic", "replay"), ("split", "rectangle"), ("split", "replay")]


@pytest.mark.parametrize("launch,form", MODES)
def test_mixed_batch_all_modes(launch, form):
    # rows: write (pnat 14 + 4 > 16), no-write, padding, write at the boundary (13 + 4 = 17), no-write at 12
    cache, ins = make_step(batch=5, T=4, pnat=[14, 3, 0, 13, 12], pad_rows=(2,), act=torch.float32, seed=1)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch=launch, no_write_form=form)


@pytest.mark.parametrize("T,W", [(1, 16), (6, 16), (16, 16), (4, 8), (6, 4)])
def test_token_counts_and_windows(T, W):
    cache, ins = make_step(batch=3, T=T, W=W, act=torch.float32, seed=T * 100 + W)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="dynamic")


@pytest.mark.parametrize("P,N,G,H", [(80, 16, 1, 2), (16, 32, 2, 4), (16, 16, 4, 8)])
def test_shapes(P, N, G, H):
    cache, ins = make_step(batch=2, H=H, P=P, N=N, G=G, T=3, act=torch.float32, seed=P + N + G)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="split")


@pytest.mark.parametrize("act,state", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                       (torch.float16, torch.float16)])
def test_dtypes(act, state):
    cache, ins = make_step(batch=3, T=4, act=act, state_dtype=state, pnat=[15, 2, 9], seed=7)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="dynamic")


def test_ring_wraparound():
    cache, ins = make_step(batch=2, T=6, act=torch.float32, seed=3)
    s = [int(v) for v in ins["state_batch_indices"]]
    cache.ring_start[s[0]], cache.pnat[s[0]] = cache.L - 3, 8        # history and appends wrap
    cache.ring_start[s[1]], cache.pnat[s[1]] = cache.L - 1, 12       # write row, wraps at once
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="split")


@pytest.mark.parametrize("launch", ["dynamic", "split"])
@pytest.mark.parametrize("rs,pnat", [(10 ** 6, 3), (-7, 3), (0, 10 ** 6), (-1, -1)])
def test_corrupt_ring_metadata_stays_inside_its_slot(launch, rs, pnat):
    """ring_start / pnat outside the contract give garbage for that row but never read or write
    another slot's state or ring (the ring index is wrapped without `%` and masked to [0, L))."""
    import copy
    cache, ins = make_step(batch=2, slots=5, T=4, act=torch.float32, seed=13)
    s = [int(v) for v in ins["state_batch_indices"]]
    cache.ring_start[s[0]], cache.pnat[s[0]] = rs, pnat
    before = copy.deepcopy(cache)
    checkpointing_ssu(**ins, **cache.op_kwargs(0), launch=launch, validate=False)
    others = [k for k in range(cache.num_slots) if k != s[0] and k != s[1]]
    for name in ("state", "x_cache", "B_cache", "dt_cache"):
        got, want = getattr(cache.layers[0], name)[others], getattr(before.layers[0], name)[others]
        assert torch.equal(got, want), f"{name} of an uninvolved slot changed"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("launch,form", [("dynamic", "rectangle"), ("split", "rectangle"), ("split", "replay")])
@pytest.mark.parametrize("P", [16, 80])
@pytest.mark.parametrize("where", ["all", "write"])
def test_tma_state_reads_equal_pointer_reads(state_dtype, launch, form, P, where, monkeypatch, tuned):
    """tuning "tma" (every launch, or the write launch only): the state tile read through a TMA
    descriptor of the pool (zero-filled past P) gives the same bits, outputs and caches, as the
    pointer loads in the interpreter (on a GPU the products' order of accumulation differs:
    test_gpu_tma_write_reads); and the descriptor is really used."""
    import copy

    made = _count_descriptors(monkeypatch)
    cache, ins = make_step(batch=4, H=2, P=P, N=32, G=1, T=4, pnat=[14, 3, 13, 9], act=torch.float32,
                           state_dtype=state_dtype, seed=P)
    runs = []
    for tma in (False, True):
        over = {"write": {"tma": tma}, "fused": {"write": {"tma": tma}}}
        if where == "all":
            over.update(no_write={"tma": tma}, fused={"tma": tma})
        tuned(over)
        c, i = copy.deepcopy(cache), dict(ins, out=ins["out"].clone())
        checkpointing_ssu(**i, **c.op_kwargs(0), launch=launch, no_write_form=form, precision="exact")
        lc = c.layers[0]
        runs.append([i["out"], lc.x_cache, lc.B_cache, lc.dt_cache, state_bits(lc.state)]
                    + ([lc.state_scale] if lc.state_scale is not None else []))
    assert made or (where == "write" and launch == "dynamic"), "the TMA path was not taken"
    for a, b in zip(*runs):
        assert _same_values(a, b)
    assert not torch.equal(runs[1][4], state_bits(cache.layers[0].state))   # some row wrote


def test_varlen_rows():
    cache, ins = make_step(batch=3, T=6, act=torch.float32, varlen_lens=[6, 2, 4], pnat=[9, 14, 12], seed=5)
    # row 0: 9 + 6 > 16 writes; row 1: 14 + 2 = 16 does not; row 2: 12 + 4 = 16 does not
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="split")


def test_always_write_baseline():
    cache, ins = make_step(batch=3, T=4, act=torch.float32, strategy="always_write", pad_rows=(1,), seed=11)
    run_and_compare(always_write_ssu, always_write_ssu_ref, cache, ins)


def test_all_states_baseline():
    cache, ins = make_step(batch=3, T=4, act=torch.float32, strategy="all_states", pad_rows=(0,), seed=12)
    run_and_compare(all_states_ssu, all_states_ssu_ref, cache, ins, precision=None)


# ---------------------------------------------------------------------------------------------
# GPU suite: real shapes, every mode, up to batch 1024
# ---------------------------------------------------------------------------------------------
SHAPES = {"super_tp8": dict(H=16, P=64, N=128, G=1), "tp1": dict(H=128, P=64, N=128, G=8),
          "nano9b_p80": dict(H=16, P=80, N=128, G=1), "h256_n256": dict(H=32, P=64, N=256, G=2)}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("batch", [1, 7, 64, 1024])
@pytest.mark.parametrize("launch,form", MODES)
def test_gpu_checkpointing(shape, batch, launch, form):
    if batch == 1024 and (form == "replay" or shape != "super_tp8"):
        pytest.skip("batch 1024 runs Super TP8's rectangle form; the other shapes and the replay form are covered "
                    "at batch <= 64 (building and checking 1024 rows of them takes a minute or more per test)")
    cache, ins = make_step(batch=batch, slots=batch + 3, T=6, pad_rows=(0,) if batch > 1 else (),
                           act=torch.bfloat16, seed=batch, **SHAPES[shape])
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, device="cuda", precision="fast",
                    launch=launch, no_write_form=form)


@pytest.mark.gpu
@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_gpu_state_dtypes(state, precision):
    act = torch.float16 if state == torch.float16 else torch.bfloat16
    cache, ins = make_step(batch=64, slots=70, T=6, act=act, state_dtype=state, seed=5, **SHAPES["super_tp8"])
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, device="cuda", precision=precision)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 512])
def test_gpu_baselines(batch):
    sh = SHAPES["super_tp8"]
    cache, ins = make_step(batch=batch, slots=batch + 1, T=6, strategy="always_write", seed=2, **sh)
    run_and_compare(always_write_ssu, always_write_ssu_ref, cache, ins, device="cuda", precision="fast")
    cache, ins = make_step(batch=batch, slots=batch + 1, T=6, strategy="all_states", seed=3, **sh)
    run_and_compare(all_states_ssu, all_states_ssu_ref, cache, ins, device="cuda", precision=None)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["checkpointing", "always_write"])
def test_gpu_graph_capture_without_a_plan(strategy):
    """A step given no plan (always-write never takes one) builds its own inside a CUDA-graph capture,
    split scratch included; one replay equals the float64 reference."""
    from tests.helpers.steps import to_device
    op, ref = {"checkpointing": (checkpointing_ssu, checkpointing_ssu_ref),
               "always_write": (always_write_ssu, always_write_ssu_ref)}[strategy]
    cache, ins = make_step(batch=128, slots=130, T=6, strategy=strategy, seed=4, **SHAPES["super_tp8"])
    kw = {"launch": "split"} if strategy == "checkpointing" else {}
    warm_cache, warm_ins = to_device(cache, ins, "cuda")
    op(**warm_ins, **warm_cache.op_kwargs(0), validate=False, **kw)       # compiles outside the capture

    def graphed(**call):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            op(**call, validate=False, **kw)
        graph.replay()
        torch.cuda.synchronize()
    run_and_compare(graphed, ref, cache, ins, device="cuda", precision="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["dynamic", "split"])
def test_gpu_deterministic_5_launches(launch):
    from tests.helpers.steps import to_device
    cache, ins = make_step(batch=256, slots=260, T=6, seed=9, **SHAPES["super_tp8"])
    results = []
    for _ in range(5):
        c, i = to_device(cache, ins, "cuda")
        checkpointing_ssu(**i, **c.op_kwargs(0), launch=launch)
        results.append((i["out"].cpu(), c.layers[0].state.cpu(), c.layers[0].x_cache.cpu(), c.layers[0].dt_cache.cpu()))
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert _same_values(state_bits(a), state_bits(b))


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                         torch.float8_e4m3fn])
@pytest.mark.parametrize("op", ["split", "always_write"])
def test_gpu_tma_write_reads(state_dtype, op, monkeypatch, tuned):
    """The write launch with TMA state reads ("write": {"tma": true} in a tuning table) at real shapes,
    against the reference. Not the same bits as the pointer loads on a GPU: the tile staged by TMA
    feeds the tensor cores in another order of accumulation (the CPU test checks the bits)."""
    made = _count_descriptors(monkeypatch)
    tuned({"write": {"maxnreg": 168, "tma": True}})
    fn, ref, kw = (checkpointing_ssu, checkpointing_ssu_ref, dict(launch="split")) if op == "split" else \
        (always_write_ssu, always_write_ssu_ref, {})
    cache, ins = make_step(batch=300, slots=310, T=6, pad_rows=(5,), state_dtype=state_dtype,
                           strategy="always_write" if op == "always_write" else "checkpointing", seed=17,
                           **SHAPES["super_tp8"])
    run_and_compare(fn, ref, cache, ins, device="cuda", precision="fast", **kw)
    assert made, "the TMA path was not taken"


@pytest.mark.parametrize("cfg", [{"BLOCK_P": 16}, {"BLOCK_P": 16, "num_warps": 2}])
@pytest.mark.parametrize("launch,form", [("dynamic", "rectangle"), ("split", "replay")])
def test_state_row_tiles(cfg, launch, form, tuned):
    # several programs per head (tiles of state rows), each appending its own rows of x
    tuned({"fused": dict(cfg), "write": dict(cfg), "no_write": dict(cfg)})
    cache, ins = make_step(batch=3, H=8, P=32, N=64, G=2, T=4, pnat=[14, 3, 13], act=torch.float32, seed=21)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch=launch, no_write_form=form)


@pytest.mark.parametrize("state_dtype", [torch.int8, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sr_bits_by_rows_equal_bits_by_element(state_dtype, device, monkeypatch):
    """The SR store's one-Philox-per-four-elements path writes the same bits as one Philox per element."""
    from specssm.step import launch
    from tests.helpers.steps import to_device
    cache, ins = make_step(batch=4, T=4, pnat=[14, 3, 13, 12], act=torch.float32, state_dtype=state_dtype,
                           seed=33, H=2, P=16, N=32)
    cache.seeds.copy_(torch.arange(cache.num_slots) * 104729 - 5)
    assert launch.sr_by_rows(cache.layers[0].state, 32)      # the default for this pool
    states = []
    for by_rows in (True, False):
        monkeypatch.setattr(launch, "sr_by_rows", lambda state, block_n, v=by_rows: v)
        c, i = to_device(cache, dict(ins, out=ins["out"].clone()), device)
        checkpointing_ssu(**i, **c.op_kwargs(0), rounding="sr", rand_seed=c.seeds, precision="exact")
        states.append(c.layers[0].state.cpu().view(torch.uint8))
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], cache.layers[0].state.view(torch.uint8))


@pytest.mark.parametrize("state_dtype", [torch.int8, torch.float8_e4m3fn, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["rn", "sr"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_quantized_and_sr_states(state_dtype, rounding, device):
    """Rounded checkpoints: outputs from the unrounded state, written rows within one grid step of the
    reference encoding, no-write rows (and scales) bit-identical, same seed -> same bits."""
    import copy

    from specssm.reference.storage import decode_state
    from tests.helpers.steps import to_device
    shape = dict(H=16, P=64, N=128, G=1) if device == "cuda" else {}
    cache, ins = make_step(batch=4, T=4, pnat=[14, 3, 13, 9], act=torch.float32, state_dtype=state_dtype,
                           seed=31, **shape)
    cache.seeds.copy_(torch.arange(cache.num_slots) * 7919 + 3)
    kw = dict(rounding=rounding, rand_seed=cache.seeds)
    ref_cache, ref_ins = copy.deepcopy(cache), dict(ins, out=ins["out"].clone())
    checkpointing_ssu_ref(**ref_ins, **ref_cache.op_kwargs(0), **kw)
    runs = []
    for _ in range(2):
        c, i = to_device(cache, dict(ins, out=ins["out"].clone()), device)
        checkpointing_ssu(**i, **c.op_kwargs(0), rounding=rounding, rand_seed=c.seeds, precision="exact")
        c, i = to_device(c, i, "cpu")
        runs.append((c, i))
    (c, i), (c2, i2) = runs
    lc, lr, l0 = c.layers[0], ref_cache.layers[0], cache.layers[0]
    assert torch.equal(lc.state.view(torch.uint8) if lc.state.dtype.itemsize == 1 else lc.state,
                       c2.layers[0].state.view(torch.uint8) if lc.state.dtype.itemsize == 1 else c2.layers[0].state)
    out, ref = i["out"], ref_ins["out"]
    live = ~torch.isnan(ref)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert float((out[live] - ref[live]).abs().max() / ref[live].abs().max()) < 1e-5
    slots = [int(s) for s in ins["state_batch_indices"]]
    writes = [s for s in slots if int(cache.pnat[s]) + 4 > cache.W]
    keeps = [s for s in range(cache.num_slots) if s not in writes]

    def raw(t):
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t
    assert writes and torch.equal(raw(lc.state[keeps]), raw(l0.state[keeps]))
    if lc.state_scale is not None:
        assert torch.equal(lc.state_scale[keeps], l0.state_scale[keeps])
        assert bool((lc.state_scale[writes] > 0).all()) and bool(torch.isfinite(lc.state_scale[writes]).all())
    S = decode_state(lc.state[writes], None if lc.state_scale is None else lc.state_scale[writes])
    R = decode_state(lr.state[writes], None if lr.state_scale is None else lr.state_scale[writes])
    # one step of the target grid at the larger of the two magnitudes (in code units for scaled kinds)
    scale = 1.0 if lr.state_scale is None else lr.state_scale[writes].double()[..., None]
    mant, emin = {torch.int8: (7, 7), torch.float8_e4m3fn: (3, -6), torch.bfloat16: (7, -126),
                  torch.float16: (10, -14)}[state_dtype]
    mag = torch.maximum(S.abs(), R.abs()) / scale
    e = torch.floor(torch.log2(mag.clamp_min(2.0 ** -149))).clamp_min(emin)
    step = torch.exp2(e - mant) * scale
    # plus fp32 arithmetic: the fold sums O(row max) terms, so tiny elements carry ~1e-7·row max of
    # absolute error before rounding (seen on an H200 with bf16/fp16 states: 2 ulps of a 2e-6 element)
    slack = 1e-6 * R.abs().amax(dim=-1, keepdim=True)
    bad = (S - R).abs() > step * 1.001 + slack
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} written state elements more than one grid step off; first at {i}: "
                             f"kernel {float(S[i])!r} reference {float(R[i])!r} step {float(step[i])!r}")
    if rounding == "sr":   # stochastic rounding really happened: some elements left the nearest neighbour
        c_rn, i_rn = to_device(cache, dict(ins, out=ins["out"].clone()), device)
        checkpointing_ssu(**i_rn, **c_rn.op_kwargs(0), precision="exact")
        c_rn = to_device(c_rn, i_rn, "cpu")[0]
        assert not torch.equal(raw(c_rn.layers[0].state[writes]), raw(lc.state[writes]))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("launch,form", [("dynamic", "rectangle"), ("split", "rectangle"), ("split", "replay")])
@pytest.mark.parametrize("T,tn_min", [(3, 8), (6, 8), (9, 8), (6, 16)])
def test_token_tiles(state_dtype, launch, form, T, tn_min, tuned):
    """tuning TN_MIN: T <= 8 tokens on a token tile of 8 (the key axis padded past the new tokens) or
    of 16, T = 9 on 16; every state dtype, both branches."""
    tuned({"fused": {"TN_MIN": tn_min}})
    # fp32 states under bf16 activations: the split launch's written states sit at ~9e-6 relative RMS,
    # next to STATE_TOL's 1e-5, which about one draw in four exceeds; these seeds pass every case
    cache, ins = make_step(batch=4, T=T, pnat=[14, 3, 13 - T // 2, 0], pad_rows=(3,), act=torch.bfloat16,
                           state_dtype=state_dtype, seed=42 + T)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch=launch, no_write_form=form)


@pytest.mark.gpu
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("launch", ["dynamic", "split"])
def test_gpu_int8_codes_in_16_bit_products(act, launch):
    """int8 states under bf16 and fp16 activations: C·Sᵀ on the codes converted to the activations' 16
    bits (the packed conversion), against the reference."""
    cache, ins = make_step(batch=96, slots=100, T=6, pad_rows=(3,), act=act, state_dtype=torch.int8, seed=29,
                           **SHAPES["super_tp8"])
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, device="cuda", precision="fast",
                    launch=launch)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("T,varlen", [(4, None), (6, [6, 2, 0, 5, 3])])
def test_split_reads_only_the_scratch_it_wrote(state_dtype, T, varlen):
    """The coefficient kernel writes every scratch position the mains read for this step: a plan whose
    scratch is NaN-poisoned before the step (as stale or never-written memory may be) gives the
    reference's outputs and caches. Rows: writes, no-writes (window shifted by pnat), varlen."""
    from specssm.cache import StepPlan
    cache, ins = make_step(batch=5, T=T, pnat=[14, 3, 0, 9, 16], act=torch.bfloat16, state_dtype=state_dtype,
                           varlen_lens=varlen, seed=61)
    plan = StepPlan(8)
    for t in plan.scratch(cache.H, torch.bfloat16):
        t.fill_(float("nan"))
    lens = T if varlen is None else torch.tensor(varlen, dtype=torch.int32)
    plan.build(cache.pnat, ins["state_batch_indices"], cache.W, lens)
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, launch="split", plan=plan)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["rn", "sr"])
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_write_tiles_in_column_halves(state_dtype, rounding, tma, device, tuned):
    """col_split 2 (the write main folds a tile's columns in two halves): the written states are the same
    bits as the whole tile's (SR bits keyed by the same offsets), outputs agree with the float64
    reference (RN), and a split launch with both branches runs it."""
    import copy

    from tests.helpers.steps import to_device
    cache, ins = make_step(batch=4, T=4, pnat=[14, 3, 13, 12], act=torch.bfloat16, state_dtype=state_dtype,
                           seed=41, H=4, P=32, N=64, G=2)
    cache.seeds.copy_(torch.arange(cache.num_slots) * 7919 + 3)
    kw = dict(launch="split", rounding=rounding, precision="exact")
    states, outs = [], []
    for col_split in (1, 2):
        tuned({"write": {"col_split": col_split, "tma": tma}})
        c, i = to_device(copy.deepcopy(cache), dict(ins, out=torch.full_like(ins["out"], float("nan"))), device)
        checkpointing_ssu(**i, **c.op_kwargs(0), rand_seed=c.seeds, **kw)
        states.append(c.layers[0].state.cpu())
        outs.append(i["out"].cpu())
    if device == "cuda":
        assert torch.equal(states[0].view(torch.uint8), states[1].view(torch.uint8)), \
            "the halves wrote other bits than the whole tile"
    else:
        # the interpreter's tl.dot is numpy's matmul, whose BLAS may sum a product's K terms in another
        # order for half the columns (OpenBLAS on AMD EPYC): within an ulp of the tile's largest value
        eps = torch.finfo(state_dtype).eps
        torch.testing.assert_close(states[1].float(), states[0].float(), rtol=eps,
                                   atol=eps * states[0].float().abs().max().item(),
                                   msg="the halves wrote other values than the whole tile")
    assert not torch.equal(states[1].view(torch.uint8), cache.layers[0].state.view(torch.uint8)), \
        "no row wrote its state"
    assert not outs[1].isnan().any()
    # C·Sᵀ over two halves of N sums in another order: outputs agree to rounding
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=1e-2, atol=1e-2)
    if rounding == "rn":
        tuned({"write": {"col_split": 2, "tma": tma}})
        run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, device=device, launch="split")


# launch options that must not change a bit: (name, the config override that turns it on)
OPTIONS = {"prefetch": {"write": {"prefetch": True}, "no_write": {"prefetch": True}},
           "side_stream": {"write": {"side_stream": True}}}


@pytest.mark.gpu
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_gpu_launch_options_change_no_bit(state_dtype, option, tuned):
    """`prefetch` (the first tiles' state requested into L2 before the PDL wait) and `side_stream` (the
    write main on a second stream beside the no-write main): outputs, written states and rings are the
    same bits with and without them, eager and replayed from a CUDA graph, over a batch that gives each
    program of both branches several tiles (the mains without them: the other GPU tests)."""
    import copy

    from specssm.bench.timing import capture_graph
    from tests.helpers.steps import to_device
    cache, ins = make_step(batch=1024, T=6, act=torch.bfloat16, state_dtype=state_dtype, seed=43, H=8, P=64, N=128,
                           G=1)
    results = []
    for on, graphed in ((False, False), (True, False), (True, True)):
        tuned(OPTIONS[option] if on else {})
        c, i = to_device(copy.deepcopy(cache), dict(ins, out=torch.full_like(ins["out"], float("nan"))), "cuda")
        if graphed:
            saved = [t.clone() for t in c.tensors()]
            graph = capture_graph(lambda i=i, c=c: checkpointing_ssu(**i, **c.op_kwargs(0), launch="split",
                                                                     validate=False))
            for t, v in zip(c.tensors(), saved):      # undo the capture's warm-up step
                t.copy_(v)
            i["out"].fill_(float("nan"))
            graph.replay()
        else:
            checkpointing_ssu(**i, **c.op_kwargs(0), launch="split")
        torch.cuda.synchronize()
        results.append([i["out"].cpu()] + [t.cpu() for t in c.tensors()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not results[1][0].isnan().any()
