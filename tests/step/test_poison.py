"""Poisoned memory (docs/faults.md): NaN / Inf where a step must not look never reaches an output or a
written state, and the step leaves it where it was; NaN / Inf in a live row's own inputs stays in that
row's outputs and its slot. Each case runs `checkpointing_ssu` twice on copies of one cache, once with
clean memory and once poisoned, and compares the two bit for bit. Public API only (SSMCache, StepPlan
via the split launch, make_step), so the tests hold for any kernel behind it."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.ops import checkpointing_ssu
from tests.helpers.steps import cache_to, make_step, to_device

# the interpreter's numpy warns about the NaN / Inf it is given here on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FIELDS = ("state", "state_scale", "x_cache", "B_cache", "dt_cache")
INPUTS = ("x", "z", "B", "C")
# rows: write (pnat 14 + 4 > 16), padding, no-write (3 + 4), write at the boundary (13 + 4 = 17)
PNAT, PAD_ROW, T = [14, 0, 3, 13], 1, 4
GPU = pytest.mark.gpu
# every state dtype on the GPU; the CPU interpreter's fp8 cast mis-rounds, and fp16 adds nothing there
STATES = [pytest.param(d, dev, marks=GPU if dev == "cuda" else ())
          for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn)
          for dev in ("cpu", "cuda") if dev == "cuda" or d in (torch.float32, torch.bfloat16, torch.int8)]


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bits of t as integers: NaN payloads compared too (NaN != NaN as floats)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """NaN, +Inf, -Inf in turn (8-bit integer codes: the extreme codes, which a scale may blow up; fp8
    e4m3 has no Inf: NaN and its largest finite values)."""
    if t.dtype == torch.int8:
        return torch.tensor([127, -128], dtype=torch.int8).repeat(t.numel() // 2 + 1)[:t.numel()].view(t.shape)
    if t.dtype == torch.float8_e4m3fn:
        v = torch.tensor([float("nan"), 448.0, -448.0]).repeat(t.numel() // 3 + 1)[:t.numel()]
        return v.view(t.shape).to(t.dtype)
    v = torch.tensor([float("nan"), float("inf"), float("-inf")]).repeat(t.numel() // 3 + 1)[:t.numel()]
    return v.view(t.shape).to(t.dtype)


def setup(state_dtype, seed=3):
    cache, ins = make_step(batch=4, H=2, P=16, N=16, G=1, T=T, slots=7, pad_rows=(PAD_ROW,), pnat=PNAT,
                           act=torch.bfloat16, state_dtype=state_dtype, seed=seed)
    rows = ins["state_batch_indices"].tolist()
    live = [s for s in rows if s != cache.pad_slot_id]
    free = [s for s in range(cache.num_slots) if s not in live]
    return cache, ins, live, free


def ring_rows(cache, slot):
    """(live window rows, rows the step appends to) of a slot's ring."""
    rs, K, L = int(cache.ring_start[slot]), int(cache.pnat[slot]), cache.L
    return [(rs + k) % L for k in range(K)], [(rs + K + t) % L for t in range(T)]


def run(cache, ins, launch, device):
    """One step on copies of the cache and inputs on `device`; the results back on the CPU."""
    c, i = to_device(copy.deepcopy(cache), dict(ins, out=ins["out"].clone()), device)
    checkpointing_ssu(**i, **c.op_kwargs(0), launch=launch)
    return cache_to(c, "cpu"), {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in i.items()}


def bits(lc, f):
    t = getattr(lc, f)
    return None if t is None else raw(t)


@pytest.mark.parametrize("launch", ["dynamic", "split"])
@pytest.mark.parametrize("state_dtype,device", STATES)
def test_poison_outside_the_live_window_never_reaches_an_output(launch, state_dtype, device):
    """NaN / Inf in (1) every ring row outside each live slot's window, (2) every tensor of the free slots
    (and garbage ring_start / pnat there), (3) the padding row's inputs: the outputs and every written
    state are those of the clean run, bit for bit; the poison is still where it was, except in the ring
    rows the step appends to (overwritten with the new tokens, as in the clean run)."""
    clean, ins, live, free = setup(state_dtype)
    dirty, dins = copy.deepcopy(clean), dict(ins)
    lc = dirty.layers[0]
    for s in live:                                         # (1) ring rows outside the live window
        window, _ = ring_rows(clean, s)
        outside = [r for r in range(clean.L) if r not in window]
        for f in ("x_cache", "B_cache", "dt_cache"):
            t = getattr(lc, f)[s]                          # (heads or groups, L, ...): ring rows in dim 1
            t[:, outside] = poison_like(t[:, outside])
    for s in free:                                         # (2) free slots, metadata included
        for f in FIELDS:
            t = getattr(lc, f)
            if t is not None:
                t[s] = poison_like(t[s])
        dirty.ring_start[s], dirty.pnat[s] = 10 ** 6, -5
    for k in INPUTS:                                       # (3) the padding row's inputs
        v = dins[k].clone()
        v[PAD_ROW] = poison_like(v[PAD_ROW])
        dins[k] = v
    dt = dins["dt"][..., 0].clone()
    dt[PAD_ROW] = float("nan")
    dins["dt"] = dt[..., None].expand(dins["dt"].shape)
    before = copy.deepcopy(dirty)

    c_clean, i_clean = run(clean, ins, launch, device)
    c_dirty, i_dirty = run(dirty, dins, launch, device)
    assert torch.equal(raw(i_dirty["out"]), raw(i_clean["out"])), "outputs differ from the clean run"
    assert torch.isfinite(i_clean["out"][[0, 2, 3]].float()).all() and i_clean["out"][PAD_ROW].isnan().all()
    got, want, old = c_dirty.layers[0], c_clean.layers[0], before.layers[0]
    for f in ("state", "state_scale"):                     # written and kept states of live slots
        if getattr(got, f) is not None:
            assert torch.equal(bits(got, f)[live], bits(want, f)[live]), f"{f}: differs from the clean run"
    assert not torch.equal(bits(want, "state")[live], bits(clean.layers[0], "state")[live]), "no row wrote"
    for s in live:
        window, appended = ring_rows(clean, s)
        kept = [r for r in range(clean.L) if r not in window + appended]
        for f in ("x_cache", "B_cache", "dt_cache"):
            g, w, o = (bits(lc_, f)[s] for lc_ in (got, want, old))
            assert torch.equal(g[:, window + appended], w[:, window + appended]), f"{f}[{s}]: live rows differ"
            assert torch.equal(g[:, kept], o[:, kept]), f"{f}[{s}]: poisoned rows outside the window changed"
    for f in FIELDS:                                       # free slots untouched
        if getattr(got, f) is not None:
            assert torch.equal(bits(got, f)[free], bits(old, f)[free]), f"{f}: a free slot changed"
    assert torch.equal(c_dirty.ring_start, before.ring_start) and torch.equal(c_dirty.pnat, before.pnat)


@pytest.mark.parametrize("launch", ["dynamic", "split"])
@pytest.mark.parametrize("state_dtype,row,device", [
    (torch.float32, 0, "cpu"), (torch.int8, 0, "cpu"), (torch.bfloat16, 2, "cpu"),
    *(pytest.param(d, row, "cuda", marks=GPU) for d in (torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                                        torch.float8_e4m3fn) for row in (0, 2))])
def test_poison_in_a_live_rows_inputs_stays_in_its_slot(launch, state_dtype, row, device):
    """NaN in one element of a live row's x and Inf in its B (new tokens) reach that row's outputs and
    its ring; every other row's outputs and every other slot's state and ring are those of the clean
    run, bit for bit. The row's checkpoint is too: a flush folds the history only (the reference's
    h_K), so the new tokens reach a checkpoint at the next flush, not this one. Row 0 flushes, row 2
    does not."""
    clean, ins, live, free = setup(state_dtype, seed=4)
    dins = dict(ins)
    x, B = dins["x"].clone(), dins["B"].clone()
    x[row, 2, 1, 5], B[row, 1, 0, 3] = float("nan"), float("inf")
    dins.update(x=x, B=B)
    c_clean, i_clean = run(clean, ins, launch, device)
    c_dirty, i_dirty = run(clean, dins, launch, device)
    others = [r for r in range(len(PNAT)) if r != row]
    assert torch.equal(raw(i_dirty["out"][others]), raw(i_clean["out"][others]))
    assert not torch.isfinite(i_dirty["out"][row].float()).all(), "the poison did not reach the row's outputs"
    slot = int(ins["state_batch_indices"][row])
    rest = [s for s in range(clean.num_slots) if s != slot]
    got, want = c_dirty.layers[0], c_clean.layers[0]
    for f in FIELDS:
        if getattr(got, f) is not None:
            assert torch.equal(bits(got, f)[rest], bits(want, f)[rest]), f"{f}: another slot differs"
    _, appended = ring_rows(clean, slot)
    assert not torch.isfinite(got.x_cache[slot][:, appended].float()).all()      # the ring holds the poison
    # the checkpoint (and scales) of the row's slot: a flush stores the clean run's h_K, a no-write row
    # leaves the old one
    written = not torch.equal(bits(want, "state")[slot], bits(clean.layers[0], "state")[slot])
    assert (PNAT[row] + T > clean.W) == written
    for f in ("state", "state_scale"):
        if getattr(got, f) is not None:
            assert torch.equal(bits(got, f)[slot], bits(want, f)[slot]), f"{f}: the new tokens reached the checkpoint"
