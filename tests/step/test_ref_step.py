"""The float64 reference of one checkpointing step, checked against the sequential recurrence.

Each case fills a ring cache at random, runs `checkpointing_ssu_ref` once and checks
(tests/helpers/steps.py, Case.check):
outputs equal the token-by-token recurrence from the true state (checkpoint + history), every output
of a live row is written and none of a padding row, the state is written iff pnat + len > W (else
bit-identical), the T new tokens land at (ring_start + pnat + t) % L and nothing else moves.
"""
import pytest
import torch

from specssm.reference import always_write_ssu_ref, checkpointing_ssu_ref
from tests.helpers.steps import PAD, make_case, rel_err, run_case, same_bits

W = 16
# (G, H): heads per group 2, 2 and 1
GROUPS = [(1, 2), (2, 4), (8, 8)]


def both_kinds(case):
    kinds = {case.writes(b) for b, _ in case.live_rows()}
    assert kinds == {True, False}, "test setup: the batch should mix write and no-write rows"


@pytest.mark.parametrize("G,H", GROUPS)
@pytest.mark.parametrize("T", [1, 4, 6, 16])
def test_flush_boundary(T, G, H):
    """pnat = W - T is the last no-write value, W - T + 1 the first write one."""
    K_stay, K_flush = W - T, W - T + 1
    case = make_case(H=H, G=G, T=T, W=W, num_slots=4, rows=[1, PAD, 0, 3],
                     pnat=[K_stay, K_flush, 0, max(W, T)], seed=T * 10 + G)
    assert case.L == max(W, T) + T
    run_case(case, checkpointing_ssu_ref)
    assert not case.writes(2) and case.writes(0)
    assert same_bits(case.state[0], case.before["state"][0])        # slot 0, pnat = W - T: untouched
    assert not same_bits(case.state[1], case.before["state"][1])    # slot 1, pnat = W - T + 1: written
    case.check()


@pytest.mark.parametrize("T", [1, 4, 6, 16])
def test_ring_wraps_around(T):
    """History and appends that run past the end of the ring continue at row 0."""
    L = max(W, T) + T
    pnat = [3, W - T, 0, max(W, T)]
    ring_start = [L - 1, L - 2, L - 1, L - 3]
    case = make_case(T=T, W=W, num_slots=4, rows=[0, 1, 2, 3], pnat=pnat, ring_start=ring_start, seed=T)
    run_case(case, checkpointing_ssu_ref)
    wraps_hist = any(min(case.history_rows(s), default=L) < ring_start[s] for s in range(4))
    wraps_app = any(min(case.append_rows(b)) < ring_start[s] for b, s in case.live_rows())
    assert wraps_hist and wraps_app, "test setup: history and appends should wrap"
    case.check()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("T", [1, 4, 6, 16])
def test_mixed_batch_random(T, seed):
    """Random pnat/ring_start, a random subset of slots in random order, padding rows between."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = 8
    slots = torch.randperm(num_slots, generator=gen)[:6].tolist()
    rows = []
    for s in slots:
        if torch.rand((), generator=gen) < 0.3:
            rows.append(PAD)
        rows.append(s)
    # force both kinds: one slot just below the flush boundary, one just above
    pnat = torch.randint(0, max(W, T) + 1, (num_slots,), generator=gen).tolist()
    pnat[slots[0]], pnat[slots[1]] = max(W - T, 0), W - T + 1
    G, H = GROUPS[seed % 3]
    case = make_case(H=H, G=G, T=T, num_slots=num_slots, rows=rows, pnat=pnat, seed=100 + seed)
    both_kinds(case)
    run_case(case, checkpointing_ssu_ref)
    case.check()


@pytest.mark.parametrize("G,H", GROUPS)
def test_head_dim_80(G, H):
    """P = 80 (Nemotron-Nano-9B-v2), not a power of two."""
    case = make_case(H=H, G=G, P=80, N=16, T=6, num_slots=4, rows=[2, PAD, 0, 1],
                     pnat=[W - 6 + 1, 0, 4, 7], ring_start=[21, 5, 19, 0], seed=5)
    both_kinds(case)
    run_case(case, checkpointing_ssu_ref)
    case.check()


@pytest.mark.parametrize("no_write_form", ["replay", "rectangle"])
@pytest.mark.parametrize("use_z", [True, False])
def test_without_gate_and_both_forms(use_z, no_write_form):
    case = make_case(T=4, num_slots=5, rows=[4, 0, PAD, 2, 1], pnat=[0, 13, 5, 12, 16], use_z=use_z, seed=3)
    both_kinds(case)
    run_case(case, checkpointing_ssu_ref, no_write_form=no_write_form)
    case.check()


@pytest.mark.parametrize("K", [0, 1, 5, 10])
@pytest.mark.parametrize("T", [1, 4, 6])
def test_rectangle_equals_replay(T, K):
    """The no-write outputs of the rectangle form (h_K never formed) equal the replay form's."""
    runs = {}
    for form in ("replay", "rectangle"):
        case = make_case(T=T, num_slots=3, rows=[0, 2, 1], pnat=[K, W - T, 0], seed=7)
        run_case(case, checkpointing_ssu_ref, no_write_form=form)
        case.check()
        runs[form] = case
    a, b = runs["replay"], runs["rectangle"]
    assert not any(a.writes(r) for r, _ in a.live_rows())
    assert rel_err(b.out, a.out) <= 1e-12
    for nm in ("state", "x_cache", "B_cache", "dt_cache"):
        assert same_bits(getattr(a, nm), getattr(b, nm)), nm


def test_rectangle_form_on_write_rows_is_the_write_branch():
    """The form only concerns no-write rows: a write row gives the same bits either way."""
    runs = []
    for form in ("replay", "rectangle"):
        case = make_case(T=6, num_slots=2, rows=[0, 1], pnat=[11, 16], seed=8)
        run_case(case, checkpointing_ssu_ref, no_write_form=form)
        runs.append(case)
    assert all(runs[0].writes(b) for b in range(2))
    assert same_bits(runs[0].out, runs[1].out) and same_bits(runs[0].state, runs[1].state)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8,
                                         torch.int16, torch.float8_e4m3fn])
def test_state_dtypes(state_dtype):
    """Rounded and quantized checkpoints: the written state is the true state within one rounding,
    the no-write rows keep state and scale bit-identical, outputs use the unrounded state."""
    case = make_case(T=6, num_slots=5, rows=[3, PAD, 1, 0, 4], pnat=[11, 2, 7, 16, 10],
                     state_dtype=state_dtype, seed=11)
    both_kinds(case)
    run_case(case, checkpointing_ssu_ref)
    case.check()


@pytest.mark.parametrize("act_dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3),
                                           (torch.float16, 1e-3)])
def test_activation_dtypes(act_dtype, tol):
    case = make_case(T=4, num_slots=4, rows=[1, 0, PAD, 3], pnat=[13, 12, 3, 0],
                     state_dtype=torch.float32, act_dtype=act_dtype, seed=12)
    both_kinds(case)
    assert case.dt_cache.dtype == torch.float32
    run_case(case, checkpointing_ssu_ref)
    case.check(out_tol=tol)


def test_compact_and_tied_parameters_agree():
    """A, D, dt_bias as (H,) and dt as (..., H) give the same bits as the stride-0 expanded views."""
    outs = []
    for compact in (False, True):
        case = make_case(T=4, num_slots=3, rows=[2, 0, 1], pnat=[13, 0, 6], seed=13)
        extra = {}
        if compact:
            extra = dict(A=case.A[:, 0, 0].clone(), D=case.D[:, 0].clone(), dt_bias=case.dt_bias[:, 0].clone(),
                         dt=case.dt[..., 0].clone())
        run_case(case, checkpointing_ssu_ref, **extra)
        case.check()
        outs.append(case)
    for nm in ("out", "state", "x_cache", "B_cache", "dt_cache"):
        assert same_bits(getattr(outs[0], nm), getattr(outs[1], nm)), nm


def test_default_window_is_ring_length_minus_T():
    a = make_case(T=4, num_slots=3, rows=[0, 1, 2], pnat=[12, 13, 2], seed=14)
    b = make_case(T=4, num_slots=3, rows=[0, 1, 2], pnat=[12, 13, 2], seed=14)
    run_case(a, checkpointing_ssu_ref)
    b.before = b.snapshot()
    checkpointing_ssu_ref(**dict(b.kwargs(), window=None))
    for nm in ("out", "state", "x_cache", "B_cache", "dt_cache"):
        assert same_bits(getattr(a, nm), getattr(b, nm)), nm


def test_without_state_batch_indices_row_b_uses_slot_b():
    case = make_case(T=4, num_slots=4, rows=[0, 1, 2], pnat=[13, 0, 12, 5], seed=15)
    case.before = case.snapshot()
    checkpointing_ssu_ref(**dict(case.kwargs(), state_batch_indices=None))
    case.check()


@pytest.mark.parametrize("T", [1, 4, 6])
def test_always_write_writes_every_row(T):
    """Always-write replay = window 0 on a ring of 2T rows: every live row stores its state."""
    case = make_case(T=T, W=0, num_slots=4, rows=[3, PAD, 1, 2], pnat=[0, T, 1, T // 2], seed=16)
    assert case.L == 2 * T
    run_case(case, always_write_ssu_ref)
    assert all(case.writes(b) for b, _ in case.live_rows())
    case.check()


def test_all_rows_padding_changes_nothing():
    case = make_case(T=4, num_slots=3, rows=[PAD, PAD], seed=17)
    run_case(case, checkpointing_ssu_ref)
    assert case.unchanged_since(case.before) == []


def test_stochastic_rounding_step_is_reproducible():
    """rounding="sr": the written state is within one step of the true state, the same seeds give
    the same bits, other seeds other bits, and no-write rows are untouched."""
    runs = []
    for seeds in ([5, 6, 7], [5, 6, 7], [8, 9, 10]):
        case = make_case(T=4, num_slots=3, rows=[0, 1, 2], pnat=[13, 0, 16], state_dtype=torch.int8, seed=30)
        run_case(case, checkpointing_ssu_ref, rounding="sr", rand_seed=torch.tensor(seeds, dtype=torch.int64))
        case.check(rounding="sr")
        runs.append(case)
    assert same_bits(runs[0].state, runs[1].state)
    assert not same_bits(runs[0].state, runs[2].state)
