"""Bad inputs of the reference steps: each kind raises ValueError/TypeError whose message starts with
the argument's name, before anything is written (caches and outputs stay bit-identical)."""
import pytest
import torch

from specssm.reference import all_states_ssu_ref, checkpointing_ssu_ref
from tests.helpers.steps import PAD, make_case, run_case, same_bits

META = torch.device("meta")


def base_case(**kw):
    args = dict(T=4, W=16, num_slots=4, rows=[2, PAD, 0, 3], pnat=[13, 0, 5, 16], seed=0)
    args.update(kw)
    return make_case(**args)


def replace(**changes):
    """A mutation of the keyword arguments: name -> function of the old value (or a value)."""
    def apply(kw):
        kw = dict(kw)
        for k, f in changes.items():
            kw[k] = f(kw.get(k)) if callable(f) else f
        return kw
    return apply


def nontied(t):
    return t.contiguous()            # same values, materialized: stride(-1) != 0


def assert_rejected_untouched(op, kw, name):
    """op(**kw) raises a ValueError/TypeError naming `name` and writes nothing."""
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device != META}
    snap = {k: v.clone() for k, v in tensors.items()}
    with pytest.raises((ValueError, TypeError)) as e:
        op(**kw)
    assert str(e.value).startswith(f"{name}:"), f"message should name {name!r}: {e.value}"
    changed = [k for k in tensors if not same_bits(tensors[k], snap[k])]
    assert changed == [], f"rejected call wrote {changed}"


# ---- checkpointing_ssu_ref -------------------------------------------------------------------

def five_rows(kw):
    """The 4-row inputs with a fifth row, on a 4-slot cache, without state_batch_indices."""
    kw = dict(kw, state_batch_indices=None)
    for k in ("x", "B", "C", "z", "out"):
        kw[k] = torch.cat([kw[k], kw[k][:1]])
    dt = torch.cat([kw["dt"][..., 0], kw["dt"][:1, ..., 0]])
    kw["dt"] = dt[..., None].expand(*dt.shape, kw["x"].shape[-1])
    return kw


SHAPE = {
    "x_cache: wrong H": (replace(x_cache=lambda t: t[:, :3]), "x_cache"),
    "dt_cache: wrong L": (replace(dt_cache=lambda t: t[:, :, :-1]), "dt_cache"),
    "state: wrong P": (replace(state=lambda t: t[:, :, :-1]), "state"),
    "B: wrong N": (replace(B=lambda t: t[..., :-1]), "B"),
    "C: wrong groups": (replace(C=lambda t: t[..., :1, :]), "C"),
    "out: wrong T": (replace(out=lambda t: t[:, :-1]), "out"),
    "z: wrong P": (replace(z=lambda t: t[..., :-1]), "z"),
    "dt: wrong H": (replace(dt=lambda t: t[..., :-1, :]), "dt"),
    "A: wrong H": (replace(A=lambda t: t[:-1]), "A"),
    "ring_start: wrong length": (replace(ring_start=lambda t: torch.cat([t, t])), "ring_start"),
    "pnat: wrong length": (replace(prev_num_accepted_tokens=lambda t: t[:-1]), "prev_num_accepted_tokens"),
    "state_batch_indices: wrong length": (replace(state_batch_indices=lambda t: t[:-1]), "state_batch_indices"),
    "x: not 4-D": (replace(x=lambda t: t[0]), "x"),
}
DTYPE = {
    "x: integer": (replace(x=lambda t: t.to(torch.int32)), "x"),
    "out: float32 for float64 x": (replace(out=lambda t: t.float()), "out"),
    "C: other dtype than B": (replace(C=lambda t: t.float()), "C"),
    "x_cache: other dtype than x": (replace(x_cache=lambda t: t.float()), "x_cache"),
    "dt_cache: float16": (replace(dt_cache=lambda t: t.half()), "dt_cache"),
    "state: uint8": (replace(state=lambda t: t.to(torch.uint8)), "state"),
    "ring_start: int64": (replace(ring_start=lambda t: t.long()), "ring_start"),
    "pnat: int64": (replace(prev_num_accepted_tokens=lambda t: t.long()), "prev_num_accepted_tokens"),
    "state_batch_indices: float": (replace(state_batch_indices=lambda t: t.float()), "state_batch_indices"),
    "dt: integer": (replace(dt=lambda t: t.to(torch.int32)), "dt"),
}
DEVICE = {f"{nm}: meta device": (replace(**{nm: lambda t: t.to(META)}), nm)
          for nm in ("state", "x_cache", "B_cache", "dt_cache", "ring_start", "prev_num_accepted_tokens",
                     "B", "C", "out", "z", "dt", "A", "D", "dt_bias", "state_batch_indices")}
TIED = {
    "dt: not tied over P": (replace(dt=nontied), "dt"),
    "A: not tied over P, N": (replace(A=nontied), "A"),
    "D: not tied over P": (replace(D=nontied), "D"),
    "dt_bias: not tied over P": (replace(dt_bias=nontied), "dt_bias"),
}
SLOTS = {
    "slot = num_slots": (replace(state_batch_indices=torch.tensor([2, PAD, 4, 3], dtype=torch.int32)),
                         "state_batch_indices"),
    "negative slot other than pad": (replace(state_batch_indices=torch.tensor([2, PAD, -2, 3], dtype=torch.int32)),
                                     "state_batch_indices"),
    "duplicate slots": (replace(state_batch_indices=torch.tensor([2, PAD, 0, 2], dtype=torch.int32)),
                        "state_batch_indices"),
    "more rows than slots without indices": (lambda kw: five_rows(kw), "x"),
}
def ring_value(name, slot, v):
    """A mutation that sets per-slot `name` (ring_start / prev_num_accepted_tokens) of `slot` to v."""
    def f(t):
        t = t.clone()
        t[slot] = v
        return t
    return replace(**{name: f})


# base_case: rows [2, PAD, 0, 3] on 4 slots (slot 1 free), W = 16, T = 4, L = 20
RING_VALUES = {
    "pnat W + 1 on a live slot": (ring_value("prev_num_accepted_tokens", 0, 17), "prev_num_accepted_tokens"),
    "pnat -1 on a live slot": (ring_value("prev_num_accepted_tokens", 3, -1), "prev_num_accepted_tokens"),
    "ring_start L on a live slot": (ring_value("ring_start", 2, 20), "ring_start"),
    "ring_start -1 on a live slot": (ring_value("ring_start", 0, -1), "ring_start"),
}
# which tensor a size shared by several is blamed on: the one that differs, not the one checked after it
SHARED_SIZES = {
    "x_cache: ring of 11": (replace(x_cache=lambda t: t[:, :, :11]), "x_cache"),
    "B_cache: ring of 11": (replace(B_cache=lambda t: t[:, :, :11]), "B_cache"),
    "state: one slot less": (replace(state=lambda t: t[:-1]), "state"),
    "x_cache: one slot less": (replace(x_cache=lambda t: t[:-1]), "x_cache"),
    "state: N + 1": (replace(state=lambda t: torch.cat([t, t[..., :1]], -1)), "state"),
    "B_cache: N - 1": (replace(B_cache=lambda t: t[..., :-1]), "B_cache"),
}
WINDOW = {
    "window 17": (replace(window=17), "window"),
    "window -1": (replace(window=-1), "window"),
}
OPTIONS = {
    "rounding": (replace(rounding="nearest"), "rounding"),
    "no_write_form": (replace(no_write_form="square"), "no_write_form"),
    "sr without seeds": (replace(rounding="sr"), "rand_seed"),
}
CASES = {**SHAPE, **DTYPE, **DEVICE, **TIED, **SLOTS, **RING_VALUES, **SHARED_SIZES, **WINDOW, **OPTIONS}


@pytest.mark.parametrize("what", list(CASES))
def test_checkpointing_bad_input(what):
    mutate, name = CASES[what]
    case = base_case()
    assert_rejected_untouched(checkpointing_ssu_ref, mutate(case.kwargs()), name)
    assert case.unchanged_since(case.before) == []


def test_ring_value_messages():
    """The message says the argument, the value, the slot, the row and the range."""
    case = base_case()
    with pytest.raises(ValueError) as e:
        checkpointing_ssu_ref(**RING_VALUES["pnat W + 1 on a live slot"][0](case.kwargs()))
    assert "expected values in [0, 16]" in str(e.value) and "got 17 for slot 0 (row 2)" in str(e.value)
    with pytest.raises(ValueError) as e:
        checkpointing_ssu_ref(**RING_VALUES["ring_start L on a live slot"][0](case.kwargs()))
    assert "expected values in [0, 20)" in str(e.value) and "got 20 for slot 2 (row 0)" in str(e.value)


def test_shared_size_messages():
    """A size several tensors share is blamed on the odd one out, and the message says whose size it
    expected; a size set by x says so."""
    case = base_case()
    with pytest.raises(ValueError) as e:
        checkpointing_ssu_ref(**SHARED_SIZES["x_cache: ring of 11"][0](case.kwargs()))
    assert "expected ring length (dim 2) 20 (that of B_cache and dt_cache), got 11" in str(e.value)
    with pytest.raises(ValueError) as e:
        checkpointing_ssu_ref(**SHAPE["x_cache: wrong H"][0](case.kwargs()))
    assert str(e.value).startswith("x_cache: expected shape (4, 4, 20, 8) (H and P of x), got (4, 3, 20, 8)")


def test_ring_values_of_slots_outside_the_step_are_not_checked():
    """Free slots (slot 1 here) may hold anything: the step neither reads nor checks them."""
    case = base_case()
    case.pnat[1], case.ring_start[1] = 10 ** 6, -7
    run_case(case, checkpointing_ssu_ref)
    case.check()


@pytest.mark.parametrize("T,window", [(6, 16), (16, 16), (16, None), (11, 4)])
def test_more_tokens_than_the_ring_holds(T, window):
    """The ring of a T=4, W=16 cache holds 20 rows: max(W, T) + T must fit in it."""
    case = base_case(T=T, L=20)
    assert case.x_cache.shape[2] == 20
    assert_rejected_untouched(checkpointing_ssu_ref, dict(case.kwargs(), window=window), "x")


def test_missing_state_scale_for_8bit_state():
    case = base_case(state_dtype=torch.int8)
    kw = case.kwargs()
    del kw["state_scale"]
    assert_rejected_untouched(checkpointing_ssu_ref, kw, "state_scale")
    assert_rejected_untouched(checkpointing_ssu_ref, dict(case.kwargs(), state_scale=case.state_scale.double()),
                              "state_scale")
    assert_rejected_untouched(checkpointing_ssu_ref, dict(case.kwargs(), state_scale=case.state_scale[:, :1]),
                              "state_scale")


def varlen_case():
    return base_case(T=6, rows=[2, PAD, 0, 3], lengths=[6, 2, 3, 1], varlen=True)


CU = {
    "does not start at 0": lambda c: torch.tensor([1, 6, 8, 11, 12], dtype=torch.int32),
    "decreasing": lambda c: torch.tensor([0, 6, 5, 11, 12], dtype=torch.int32),
    "does not end at the token count": lambda c: torch.tensor([0, 6, 8, 11, 11], dtype=torch.int32),
    "row longer than max_seqlen": lambda c: torch.tensor([0, 7, 8, 11, 12], dtype=torch.int32),
    "float": lambda c: c.float(),
    "2-D": lambda c: c[None],
    "meta device": lambda c: c.to(META),
}


@pytest.mark.parametrize("what", list(CU))
def test_bad_cu_seqlens(what):
    case = varlen_case()
    assert case.cu_seqlens.tolist() == [0, 6, 8, 11, 12]
    assert_rejected_untouched(checkpointing_ssu_ref, dict(case.kwargs(), cu_seqlens=CU[what](case.cu_seqlens)),
                              "cu_seqlens")
    assert case.unchanged_since(case.before) == []


def test_varlen_without_max_seqlen():
    case = varlen_case()
    assert_rejected_untouched(checkpointing_ssu_ref, dict(case.kwargs(), max_seqlen=None), "max_seqlen")


def test_varlen_with_padded_x():
    case = base_case()
    kw = dict(case.kwargs(), cu_seqlens=torch.tensor([0, 4, 8, 12, 16], dtype=torch.int32), max_seqlen=4)
    assert_rejected_untouched(checkpointing_ssu_ref, kw, "x")


# ---- all_states_ssu_ref ----------------------------------------------------------------------

def all_states_kwargs(T=4, H=4, P=8, N=8, G=2, slots=4, rows=(2, PAD, 0, 3)):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)     # noqa: E731
    b = len(rows)
    return dict(states=r(slots, T, H, P, N), state_index=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                x=r(b, T, H, P), dt=r(b, T, H)[..., None].expand(b, T, H, P),
                A=(-r(H).exp())[:, None, None].expand(H, P, N), B=r(b, T, G, N), C=r(b, T, G, N),
                out=torch.full((b, T, H, P), float("nan"), dtype=torch.float64), D=r(H)[:, None].expand(H, P),
                z=r(b, T, H, P), dt_bias=r(H)[:, None].expand(H, P), dt_softplus=True,
                state_batch_indices=torch.tensor(rows, dtype=torch.int32), pad_slot_id=PAD)


ALL_STATES = {
    "states: wrong T": (replace(states=lambda t: t[:, :-1]), "states"),
    "states: int8": (replace(states=lambda t: t.to(torch.int8)), "states"),
    "states: meta device": (replace(states=lambda t: t.to(META)), "states"),
    "state_index: int64": (replace(state_index=lambda t: t.long()), "state_index"),
    "state_index: wrong length": (replace(state_index=lambda t: t[:-1]), "state_index"),
    "state_index: value T": (replace(state_index=torch.tensor([0, 1, 2, 4], dtype=torch.int32)), "state_index"),
    "x: integer": (replace(x=lambda t: t.to(torch.int32)), "x"),
    "B: wrong N": (replace(B=lambda t: t[..., :-1]), "B"),
    "B: groups not dividing heads": (replace(B=lambda t: t[..., :1, :].expand(-1, -1, 3, -1).contiguous(),
                                             C=lambda t: t[..., :1, :].expand(-1, -1, 3, -1).contiguous()), "B"),
    "C: other dtype than B": (replace(C=lambda t: t.float()), "C"),
    "C: meta device": (replace(C=lambda t: t.to(META)), "C"),
    "out: float32": (replace(out=lambda t: t.float()), "out"),
    "z: wrong shape": (replace(z=lambda t: t[:, :-1]), "z"),
    "dt: not tied over P": (replace(dt=nontied), "dt"),
    "A: not tied over P, N": (replace(A=nontied), "A"),
    "slot out of range": (replace(state_batch_indices=torch.tensor([2, PAD, 4, 3], dtype=torch.int32)),
                          "state_batch_indices"),
    "duplicate slots": (replace(state_batch_indices=torch.tensor([2, PAD, 2, 3], dtype=torch.int32)),
                        "state_batch_indices"),
    "state_batch_indices: wrong length": (replace(state_batch_indices=lambda t: t[:-1]), "state_batch_indices"),
    "state_batch_indices: float": (replace(state_batch_indices=lambda t: t.float()), "state_batch_indices"),
}


@pytest.mark.parametrize("what", list(ALL_STATES))
def test_all_states_bad_input(what):
    mutate, name = ALL_STATES[what]
    assert_rejected_untouched(all_states_ssu_ref, mutate(all_states_kwargs()), name)
