"""conv1d_update (Triton) against the float64 references, the sequential conv, and bad inputs.

CPU: run under TRITON_INTERPRET=1 with small shapes. GPU (``-m gpu``): the same checks at a
realistic size (batch 256, conv_dim = 16*64 + 2*1*128) plus CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

from specssm._runtime import kernels_interpreted
from specssm.conv import conv1d_update, conv_commit, conv_state_from_prefill, new_conv_offset, new_conv_state
from specssm.conv.reference import conv1d_sequential_ref, conv1d_update_ref, conv1d_window_ref, conv_context_ref

# Small tests run the kernel on CPU tensors (marked interpreter), which only the interpreter can do.
INTERPRETING = kernels_interpreted()

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# rtol ~ one rounding of the output dtype; atol covers fp32 accumulation order near zero. The Triton
# interpreter (CPU) converts fp32 -> bf16 by truncation, not round-to-nearest as the GPU does, so its
# bf16 error reaches a full unit (2^-7) instead of half a unit (2^-8).
TOL = {torch.bfloat16: (2 ** -7 if INTERPRETING else 2 ** -8, 1e-5), torch.float16: (2 ** -10, 1e-5),
       torch.float32: (2e-6, 1e-5)}

SUPER_TP8_CONV_DIM = 16 * 64 + 2 * 1 * 128  # H*P + 2*G*N = 1280


def make_case(batch, T, conv_dim, d_conv, T_max, num_slots, dtype, device, *, bias=True, pad_rows=(),
              seed=0):
    """Random step inputs: slots a random injection of rows into slots, some rows pad, random offsets."""
    g = torch.Generator().manual_seed(seed)
    xBC = torch.randn(batch, T, conv_dim, generator=g).to(dtype)
    conv_state = torch.randn(num_slots, d_conv - 1 + T_max, conv_dim, generator=g).to(dtype)
    conv_offset = torch.randint(0, T_max + 1, (num_slots,), generator=g, dtype=torch.int32)
    weight = torch.randn(conv_dim, d_conv, generator=g) * 0.5
    b = torch.randn(conv_dim, generator=g) * 0.5 if bias else None
    idx = torch.randperm(num_slots, generator=g)[:batch].to(torch.int32)
    for r in pad_rows:
        idx[r] = -1
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(xBC), to(conv_state), to(conv_offset), to(weight), to(b), to(idx)


def check_step(xBC, conv_state, conv_offset, weight, bias, activation, idx, pad_slot_id=-1, **kw):
    """Run the kernel on NaN-poisoned outputs and compare output and state with the reference."""
    ref_out, ref_state, live = conv1d_update_ref(xBC, conv_state, conv_offset, weight, bias, activation,
                                                 idx, pad_slot_id)
    x_before, off_before = xBC.clone(), conv_offset.clone()
    out = torch.full_like(xBC, float("nan"))
    got = conv1d_update(xBC, conv_state, conv_offset, weight, bias, activation, idx, pad_slot_id, out=out, **kw)
    assert got is out
    rtol, atol = TOL[xBC.dtype]
    torch.testing.assert_close(out[live].double(), ref_out[live], rtol=rtol, atol=atol)
    assert not out[live].isnan().any(), "some output element was not written"
    assert out[~live].isnan().all(), "a pad row's output was written"
    assert torch.equal(conv_state, ref_state), "conv_state differs from [context, new inputs] (or a pad slot moved)"
    assert torch.equal(conv_offset, off_before), "conv_offset must only change on commit"
    assert torch.equal(xBC, x_before)


# ---------------------------------------------------------------------------------------------------
# kernel vs float64 reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("T", [1, 2, 4, 6])
@pytest.mark.parametrize("d_conv", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, d_conv, T):
    # conv_dim 150: not a power of two, two channel blocks; row 1 is a pad row.
    case = make_case(3, T, 150, d_conv, T_max=6, num_slots=5, dtype=dtype, device="cpu", pad_rows=(1,),
                     seed=100 * d_conv + T)
    xBC, conv_state, conv_offset, weight, bias, idx = case
    check_step(xBC, conv_state, conv_offset, weight, bias, "silu", idx)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias,activation", [(False, "silu"), (True, None), (False, None), (True, "swish")])
def test_bias_and_activation_variants(bias, activation):
    xBC, conv_state, conv_offset, weight, b, idx = make_case(2, 3, 24, 4, 4, 3, torch.float32, "cpu", bias=bias)
    check_step(xBC, conv_state, conv_offset, weight, b, activation, idx)


@pytest.mark.interpreter
def test_conv1d_module_weight_and_low_precision_weights():
    xBC, conv_state, conv_offset, weight, bias, idx = make_case(2, 4, 40, 4, 4, 2, torch.bfloat16, "cpu")
    # nn.Conv1d(groups=conv_dim).weight is (conv_dim, 1, d_conv); bf16 weights/bias are read as fp32.
    check_step(xBC, conv_state, conv_offset, weight.to(torch.bfloat16)[:, None, :], bias.to(torch.bfloat16),
               "silu", idx)


@pytest.mark.interpreter
def test_no_state_batch_indices_means_slot_is_row():
    xBC, conv_state, conv_offset, weight, bias, _ = make_case(2, 2, 33, 3, 2, 4, torch.float16, "cpu")
    ref_untouched = conv_state[2:].clone()
    check_step(xBC, conv_state, conv_offset, weight, bias, "silu", None)
    assert torch.equal(conv_state[2:], ref_untouched)


@pytest.mark.interpreter
def test_pad_rows_read_and_write_nothing():
    # All rows pad, with a custom pad id and int64 indices: nothing at all may change.
    xBC, conv_state, conv_offset, weight, bias, _ = make_case(3, 4, 20, 4, 4, 3, torch.bfloat16, "cpu")
    idx = torch.full((3,), 7, dtype=torch.int64)
    state_before = conv_state.clone()
    out = torch.full_like(xBC, float("nan"))
    conv1d_update(xBC, conv_state, conv_offset, weight, bias, state_batch_indices=idx, pad_slot_id=7, out=out)
    assert out.isnan().all()
    assert torch.equal(conv_state, state_before)
    # Mixed: the live row's slot changes, the slot a pad row would have been redirected to (0) does not.
    idx = torch.tensor([7, 2, 7], dtype=torch.int64)
    check_step(xBC, conv_state, conv_offset, weight, bias, "silu", idx, pad_slot_id=7)
    assert torch.equal(conv_state[:2], state_before[:2])


@pytest.mark.interpreter
def test_strided_input_and_in_place_output():
    # xBC as a column slice of a wider projection output (the Mamba2 layout), out = xBC (in place).
    g = torch.Generator().manual_seed(3)
    batch, T, conv_dim, d_conv = 3, 4, 48, 4
    zxbcdt = torch.randn(batch, T, 16 + conv_dim + 8, generator=g).to(torch.float16)
    xBC = zxbcdt[:, :, 16:16 + conv_dim]
    _, conv_state, conv_offset, weight, bias, idx = make_case(batch, T, conv_dim, d_conv, 5, 4, torch.float16, "cpu")
    ref_out, ref_state, live = conv1d_update_ref(xBC, conv_state, conv_offset, weight, bias, "silu", idx)
    got = conv1d_update(xBC, conv_state, conv_offset, weight, bias, "silu", idx, out=xBC)
    assert got is xBC
    torch.testing.assert_close(xBC.double(), ref_out, rtol=TOL[torch.float16][0], atol=1e-5)
    assert torch.equal(conv_state, ref_state)


@pytest.mark.interpreter
def test_pdl_gives_the_same_outputs_and_state():
    """pdl=True only adds a launch hint (off in the interpreter and below sm_90): same results."""
    import specssm.conv.conv1d as mod

    assert not mod._pdl_supported(torch.device("cpu"))
    case = make_case(3, 4, 150, 4, T_max=6, num_slots=5, dtype=torch.bfloat16, device="cpu", pad_rows=(1,))
    xBC, conv_state, conv_offset, weight, bias, idx = case
    check_step(xBC, conv_state.clone(), conv_offset, weight, bias, "silu", idx, pdl=True)
    results = []
    for pdl in (False, True):
        state, out = conv_state.clone(), torch.zeros_like(xBC)
        conv1d_update(xBC, state, conv_offset, weight, bias, "silu", idx, out=out, pdl=pdl)
        results.append((out, state))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.interpreter
def test_empty_batch():
    _, conv_state, conv_offset, weight, bias, _ = make_case(1, 2, 8, 2, 2, 2, torch.float32, "cpu")
    out = conv1d_update(torch.empty(0, 2, 8), conv_state, conv_offset, weight, bias)
    assert out.shape == (0, 2, 8)


# ---------------------------------------------------------------------------------------------------
# speculation: update + commit over many steps == sequential conv over the accepted tokens
# ---------------------------------------------------------------------------------------------------
def run_speculative_steps(dtype, d_conv, batch, conv_dim, num_slots, T_max, steps, device, seed):
    g = torch.Generator().manual_seed(seed)
    rtol, atol = TOL[dtype]
    weight = (torch.randn(conv_dim, d_conv, generator=g) * 0.5).to(device)
    bias = (torch.randn(conv_dim, generator=g) * 0.5).to(device)
    conv_state = new_conv_state(num_slots, conv_dim, d_conv, T_max, dtype, device)
    conv_state.copy_(torch.randn(conv_state.shape, generator=g).to(dtype))  # garbage a prefill must not leak
    conv_offset = new_conv_offset(num_slots, device)
    conv_offset.copy_(torch.randint(0, T_max + 1, (num_slots,), generator=g))

    # Prefill every slot; prompt lengths include 0 and lengths shorter than d_conv - 1.
    L = 5
    prompts = torch.randn(num_slots, L, conv_dim, generator=g).to(dtype).to(device)
    seq_lens = torch.randint(0, L + 1, (num_slots,), generator=g)
    seq_lens[:3] = torch.tensor([0, 1, L])
    seq_lens = seq_lens.to(device)
    all_slots = torch.arange(num_slots, device=device)
    conv_state_from_prefill(conv_state, conv_offset, all_slots, prompts, d_conv, seq_lens)
    # Sequential truth: feed each prompt token by token through a zero window.
    window = torch.zeros(num_slots, d_conv - 1, conv_dim, dtype=dtype, device=device)
    for s in range(num_slots):
        n = int(seq_lens[s])
        _, window[s:s + 1] = conv1d_sequential_ref(prompts[s:s + 1, :n], window[s:s + 1], weight, bias)
    assert torch.equal(conv_context_ref(conv_state, conv_offset, all_slots, d_conv), window)

    accepted_total = 0
    for step in range(steps):
        T = int(torch.randint(1, T_max + 1, (1,), generator=g))
        slots = torch.randperm(num_slots, generator=g)[:batch]
        pad = torch.rand(batch, generator=g) < 0.2
        idx = torch.where(pad, torch.full_like(slots, -1), slots).to(device)
        live_rows = (~pad).nonzero().flatten().tolist()
        xBC = torch.randn(batch, T, conv_dim, generator=g).to(dtype).to(device)  # token 0 + T-1 drafts
        accepted = torch.randint(1, T + 1, (batch,), generator=g)
        accepted[torch.rand(batch, generator=g) < 0.1] = 0  # 0 = discard the whole step (abort)
        accepted = accepted.to(device)

        out = torch.full_like(xBC, float("nan"))
        conv1d_update(xBC, conv_state, conv_offset, weight, bias, "silu", idx, out=out)
        conv_commit(conv_offset, idx, accepted)

        for r in live_rows:
            s, a = int(slots[r]), int(accepted[r])
            seq_out, window[s:s + 1] = conv1d_sequential_ref(xBC[r:r + 1, :a], window[s:s + 1], weight, bias)
            torch.testing.assert_close(out[r:r + 1, :a].double(), seq_out, rtol=rtol, atol=atol)
            accepted_total += a
        for r in (pad.nonzero().flatten().tolist()):
            assert out[r].isnan().all()
        # After the commit every slot's next context is exactly the sequential window (pad and unused
        # slots included: they must not have moved).
        assert torch.equal(conv_context_ref(conv_state, conv_offset, all_slots, d_conv), window), f"step {step}"
    assert accepted_total > 0


@pytest.mark.interpreter
@pytest.mark.parametrize("d_conv", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_speculative_steps_equal_sequential(dtype, d_conv):
    run_speculative_steps(dtype, d_conv, batch=3, conv_dim=20, num_slots=5, T_max=6, steps=12, device="cpu",
                          seed=7 * d_conv + DTYPES.index(dtype))


# ---------------------------------------------------------------------------------------------------
# bad inputs: one per kind; the message names the argument and nothing is written
# ---------------------------------------------------------------------------------------------------
def _bad(**changes):
    return changes


BAD_INPUTS = {
    "xBC_not_tensor": (_bad(xBC=[1.0]), TypeError, "xBC"),
    "xBC_2d": (_bad(xBC=lambda a: a["xBC"][:, 0]), ValueError, "xBC"),
    "xBC_int_dtype": (_bad(xBC=lambda a: a["xBC"].to(torch.int32)), TypeError, "xBC"),
    "xBC_zero_tokens": (_bad(xBC=lambda a: a["xBC"][:, :0]), ValueError, "xBC"),
    "T_over_capacity": (_bad(xBC=lambda a: torch.randn(2, 5, 24).to(torch.bfloat16)), ValueError, "T_max = 4"),
    "conv_state_dtype": (_bad(conv_state=lambda a: a["conv_state"].float()), TypeError, "conv_state"),
    "conv_state_conv_dim": (_bad(conv_state=lambda a: a["conv_state"][:, :, :16]), ValueError, "conv_state"),
    "conv_state_aliases_xBC": (_bad(xBC=lambda a: a["conv_state"][:2, :3]), ValueError, "xBC"),
    "conv_offset_dtype": (_bad(conv_offset=lambda a: a["conv_offset"].long()), TypeError, "conv_offset"),
    "conv_offset_shape": (_bad(conv_offset=lambda a: a["conv_offset"][:2]), ValueError, "conv_offset"),
    "conv_offset_out_of_range": (_bad(conv_offset=lambda a: a["conv_offset"] + 5), ValueError, "conv_offset"),
    "weight_d_conv_5": (_bad(weight=lambda a: torch.randn(24, 5)), ValueError, "weight"),
    "weight_conv_dim": (_bad(weight=lambda a: torch.randn(23, 4)), ValueError, "weight"),
    "weight_dtype": (_bad(weight=lambda a: a["weight"].double()), TypeError, "weight"),
    "bias_shape": (_bad(bias=lambda a: torch.randn(25)), ValueError, "bias"),
    "bias_dtype": (_bad(bias=lambda a: a["bias"].to(torch.int64)), TypeError, "bias"),
    "activation": (_bad(activation="relu"), ValueError, "activation"),
    "indices_dtype": (_bad(state_batch_indices=lambda a: a["state_batch_indices"].float()), TypeError,
                      "state_batch_indices"),
    "indices_shape": (_bad(state_batch_indices=lambda a: a["state_batch_indices"][:1]), ValueError,
                      "state_batch_indices"),
    "indices_out_of_range": (_bad(state_batch_indices=lambda a: torch.tensor([0, 3], dtype=torch.int32)),
                             ValueError, "state_batch_indices"),
    "indices_negative_not_pad": (_bad(state_batch_indices=lambda a: torch.tensor([-2, 1], dtype=torch.int32)),
                                 ValueError, "state_batch_indices"),
    "indices_duplicate": (_bad(state_batch_indices=lambda a: torch.tensor([1, 1], dtype=torch.int32)),
                          ValueError, "state_batch_indices"),
    "batch_over_slots_without_indices": (
        _bad(xBC=lambda a: torch.randn(4, 3, 24).to(torch.bfloat16), state_batch_indices=None), ValueError, "xBC"),
    "pad_slot_id_type": (_bad(pad_slot_id=-1.0), TypeError, "pad_slot_id"),
    "out_shape": (_bad(out=lambda a: torch.empty(2, 3, 23, dtype=torch.bfloat16)), ValueError, "out"),
    "out_dtype": (_bad(out=lambda a: torch.empty(2, 3, 24, dtype=torch.float32)), TypeError, "out"),
    "out_aliases_state": (_bad(out=lambda a: a["conv_state"][:2, :3]), ValueError, "out"),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_caches(kind):
    changes, exc, needle = BAD_INPUTS[kind]
    xBC, conv_state, conv_offset, weight, bias, idx = make_case(2, 3, 24, 4, 4, 3, torch.bfloat16, "cpu")
    args = dict(xBC=xBC, conv_state=conv_state, conv_offset=conv_offset, weight=weight, bias=bias,
                activation="silu", state_batch_indices=idx, pad_slot_id=-1, out=None)
    for name, change in changes.items():
        args[name] = change(args) if callable(change) else change
    state_before, offset_before = conv_state.clone(), conv_offset.clone()
    with pytest.raises(exc) as err:
        conv1d_update(**args)
    msg = str(err.value)
    assert needle in msg, msg
    assert "got" in msg and "expected" in msg, msg
    assert torch.equal(conv_state, state_before) and torch.equal(conv_offset, offset_before)


def test_cpu_tensors_without_interpreter_are_rejected(monkeypatch):
    import specssm.conv.conv1d as mod

    monkeypatch.setattr(mod, "kernels_interpreted", lambda kernel=None: False)
    xBC, conv_state, conv_offset, weight, bias, idx = make_case(2, 3, 24, 4, 4, 3, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="xBC: got device cpu"):
        conv1d_update(xBC, conv_state, conv_offset, weight, bias, state_batch_indices=idx)


# ---------------------------------------------------------------------------------------------------
# GPU: realistic size, CUDA graphs, validate flag
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 4, 6])
@pytest.mark.parametrize("d_conv", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference_realistic(dtype, d_conv, T):
    batch, num_slots = 256, 300
    case = make_case(batch, T, SUPER_TP8_CONV_DIM, d_conv, T_max=6, num_slots=num_slots, dtype=dtype,
                     device="cuda", pad_rows=(0, 17, 255), seed=1000 + 10 * d_conv + T)
    xBC, conv_state, conv_offset, weight, bias, idx = case
    check_step(xBC, conv_state, conv_offset, weight, bias, "silu", idx, validate=True)
    # Without indices (slot = row) and without bias/activation.
    xBC, conv_state, conv_offset, weight, _, _ = case
    check_step(xBC, conv_state, conv_offset, weight, None, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_speculative_steps_equal_sequential(dtype):
    run_speculative_steps(dtype, 4, batch=64, conv_dim=SUPER_TP8_CONV_DIM, num_slots=80, T_max=6, steps=6,
                          device="cuda", seed=11)


@pytest.mark.gpu
def test_gpu_cuda_graph_step_and_commit():
    """Update + commit captured once and replayed with new inputs/acceptance: no host sync inside."""
    dtype, d_conv, T, batch, num_slots, conv_dim = torch.bfloat16, 4, 6, 32, 40, SUPER_TP8_CONV_DIM
    xBC, conv_state, conv_offset, weight, bias, idx = make_case(batch, T, conv_dim, d_conv, T, num_slots,
                                                                dtype, "cuda", pad_rows=(3,), seed=5)
    accepted = torch.ones(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(xBC)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph (compiles for these very tensors)
        conv1d_update(xBC, conv_state, conv_offset, weight, bias, "silu", idx, out=out)
        conv_commit(conv_offset, idx, accepted)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        conv1d_update(xBC, conv_state, conv_offset, weight, bias, "silu", idx, out=out)
        conv_commit(conv_offset, idx, accepted)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        xBC.copy_(torch.randn(xBC.shape, generator=g).to(dtype))
        accepted.copy_(torch.randint(1, T + 1, (batch,), generator=g))
        ref_out, ref_state, live = conv1d_update_ref(xBC, conv_state, conv_offset, weight, bias, "silu", idx)
        ref_offset = conv_offset.clone()
        ref_offset[idx[live].long()] = accepted[live]
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out[live].double(), ref_out[live], rtol=TOL[dtype][0], atol=1e-5)
        assert torch.equal(conv_state, ref_state)
        assert torch.equal(conv_offset, ref_offset)


@pytest.mark.gpu
def test_gpu_validate_flag_catches_bad_slots():
    xBC, conv_state, conv_offset, weight, bias, idx = make_case(4, 2, 64, 4, 2, 6, torch.float16, "cuda")
    bad = idx.clone()
    bad[1] = 6
    state_before = conv_state.clone()
    with pytest.raises(ValueError, match="state_batch_indices"):
        conv1d_update(xBC, conv_state, conv_offset, weight, bias, state_batch_indices=bad, validate=True)
    assert torch.equal(conv_state, state_before)


def test_window_reference_equals_sequential_reference():
    # The two references agree on their own (guards the references, not the kernel).
    g = torch.Generator().manual_seed(9)
    xBC = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    w, b = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    seq_out, win = conv1d_sequential_ref(xBC, ctx, w, b)
    torch.testing.assert_close(conv1d_window_ref(xBC, ctx, w, b), seq_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(win, xBC[:, -3:])


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", ["slot", "offset"])
def test_bad_slot_or_offset_touches_nothing_without_validation(bad):
    """The kernel's own guard (what validate=False leaves on a GPU; on the CPU the wrapper checks these
    values on the host, so the launch is called directly): a row naming a slot outside the pool, or a
    slot whose read offset lies past its rows, writes no output and no conv state; the other rows and
    slots are those of the same step with the row as padding."""
    from specssm.conv.conv1d import _launch
    xBC, conv_state, conv_offset, weight, b, idx = make_case(3, 4, 150, 4, T_max=6, num_slots=5,
                                                               dtype=torch.float32, device="cpu")
    if bad == "slot":
        idx[1] = 5
    else:
        conv_offset[int(idx[1])] = 1000
    clean_idx = idx.clone()
    clean_idx[1] = -1
    runs = []
    for rows in (idx, clean_idx):
        state, out = conv_state.clone(), torch.full_like(xBC, float("nan"))
        _launch(xBC, state, conv_offset, weight, b, True, rows, -1, out)
        runs.append((state, out))
    (state, out), (clean_state, clean_out) = runs
    assert torch.equal(state, clean_state) and torch.equal(out.isnan(), clean_out.isnan())
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(clean_out)) and bool(out[1].isnan().all())
