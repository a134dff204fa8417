"""Conv cache helpers: prefill initialisation, commit (pad rows, slot 0), and their input checks."""

from __future__ import annotations

import pytest
import torch

from specssm.conv import conv_commit, conv_state_from_prefill, new_conv_offset, new_conv_state
from specssm.conv.reference import conv1d_sequential_ref, conv_context_ref


@pytest.mark.parametrize("d_conv", [2, 3, 4])
def test_prefill_context_is_last_inputs_zero_padded(d_conv):
    g = torch.Generator().manual_seed(d_conv)
    num_slots, L, conv_dim = 6, 4, 10
    conv_state = new_conv_state(num_slots, conv_dim, d_conv, 3, torch.bfloat16)
    conv_state.copy_(torch.randn(conv_state.shape, generator=g))
    conv_offset = torch.full((num_slots,), 2, dtype=torch.int32)
    untouched = conv_state[[0, 5]].clone()
    slots = torch.tensor([3, 1, 4, 2], dtype=torch.int32)
    seq_lens = torch.tensor([0, 1, 2, L], dtype=torch.int64)
    prompts = torch.randn(4, L, conv_dim, generator=g).to(torch.bfloat16)
    conv_state_from_prefill(conv_state, conv_offset, slots, prompts, d_conv, seq_lens)

    assert conv_offset.tolist() == [2, 0, 0, 0, 0, 2]
    assert torch.equal(conv_state[[0, 5]], untouched)
    w = torch.randn(conv_dim, d_conv, generator=g)
    for i in range(4):
        zero = torch.zeros(1, d_conv - 1, conv_dim, dtype=torch.bfloat16)
        _, window = conv1d_sequential_ref(prompts[i:i + 1, :int(seq_lens[i])], zero, w)
        got = conv_context_ref(conv_state, conv_offset, slots[i:i + 1], d_conv)
        assert torch.equal(got, window), f"prompt {i} (length {int(seq_lens[i])})"


def test_prefill_default_lengths_and_empty_prompt():
    conv_state = new_conv_state(2, 4, 4, 2, torch.float32)
    conv_offset = new_conv_offset(2)
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)
    conv_state_from_prefill(conv_state, conv_offset, torch.tensor([1, 0]), x, 4)
    assert torch.equal(conv_state[1, :3], x[0, 2:]) and torch.equal(conv_state[0, :3], x[1, 2:])
    conv_state_from_prefill(conv_state, conv_offset, torch.tensor([0]), x[:1, :0], 4)
    assert torch.equal(conv_state[0, :3], torch.zeros(3, 4))


def test_commit_sets_offsets_and_skips_pad_rows():
    conv_offset = torch.tensor([3, 3, 3, 3], dtype=torch.int32)
    # Pad rows are redirected to slot 0 internally; a live row of slot 0 must still win.
    slots = torch.tensor([-1, 0, -1, 2], dtype=torch.int64)
    accepted = torch.tensor([5, 1, 6, 4], dtype=torch.int32)
    conv_commit(conv_offset, slots, accepted)
    assert conv_offset.tolist() == [1, 3, 4, 3]
    # No slots: row i commits slot i; custom pad id.
    conv_commit(conv_offset, None, torch.tensor([2, 2], dtype=torch.int64))
    assert conv_offset.tolist() == [2, 2, 4, 3]
    conv_commit(conv_offset, torch.tensor([9, 3], dtype=torch.int32), torch.tensor([1, 6]), pad_slot_id=9)
    assert conv_offset.tolist() == [2, 2, 4, 6]


COMMIT_BAD = {
    "offset_dtype": (dict(conv_offset=torch.zeros(4, dtype=torch.int64)), TypeError, "conv_offset"),
    "accepted_not_tensor": (dict(accepted=[1, 2]), TypeError, "accepted"),
    "accepted_float": (dict(accepted=torch.ones(2)), TypeError, "accepted"),
    "accepted_negative": (dict(accepted=torch.tensor([-1, 1])), ValueError, "accepted"),
    "accepted_over_T": (dict(accepted=torch.tensor([1, 5]), num_tokens=4), ValueError, "accepted"),
    "slots_shape": (dict(slots=torch.tensor([0, 1, 2])), ValueError, "slots"),
    "slots_out_of_range": (dict(slots=torch.tensor([0, 4])), ValueError, "slots"),
    "slots_duplicate": (dict(slots=torch.tensor([2, 2])), ValueError, "slots"),
    "too_many_rows": (dict(slots=None, accepted=torch.ones(5, dtype=torch.int32)), ValueError, "accepted"),
}


@pytest.mark.parametrize("kind", list(COMMIT_BAD))
def test_commit_bad_input(kind):
    changes, exc, needle = COMMIT_BAD[kind]
    conv_offset = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    args = dict(conv_offset=conv_offset, slots=torch.tensor([0, 1]), accepted=torch.tensor([1, 2]))
    args.update({k: v for k, v in changes.items() if k != "num_tokens"})
    with pytest.raises(exc) as err:
        conv_commit(**args, num_tokens=changes.get("num_tokens"))
    assert needle in str(err.value) and "expected" in str(err.value), str(err.value)
    assert conv_offset.tolist() == [1, 2, 3, 4]


PREFILL_BAD = {
    "d_conv": (dict(d_conv=5), ValueError, "d_conv"),
    "xBC_conv_dim": (dict(xBC=torch.zeros(2, 3, 5)), ValueError, "xBC"),
    "slots_out_of_range": (dict(slots=torch.tensor([0, 3])), ValueError, "slots"),
    "seq_lens_too_long": (dict(seq_lens=torch.tensor([1, 4])), ValueError, "seq_lens"),
    "conv_offset_shape": (dict(conv_offset=torch.zeros(2, dtype=torch.int32)), ValueError, "conv_offset"),
}


@pytest.mark.parametrize("kind", list(PREFILL_BAD))
def test_prefill_bad_input(kind):
    changes, exc, needle = PREFILL_BAD[kind]
    conv_state = torch.randn(3, 5, 4)
    conv_offset = torch.tensor([1, 2, 3], dtype=torch.int32)
    state_before = conv_state.clone()
    args = dict(conv_state=conv_state, conv_offset=conv_offset, slots=torch.tensor([0, 1]),
                xBC=torch.zeros(2, 3, 4), d_conv=4, seq_lens=None)
    args.update(changes)
    with pytest.raises(exc) as err:
        conv_state_from_prefill(**args)
    assert needle in str(err.value) and "expected" in str(err.value), str(err.value)
    assert torch.equal(conv_state, state_before) and conv_offset.tolist() == [1, 2, 3]
