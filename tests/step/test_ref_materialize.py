"""materialize_ref, the specification of materialize: each destination stores the encoding of its
source's implied state (RN, or SR with the destination's seed), bit for bit, and becomes a fresh slot."""
from __future__ import annotations

import copy

import pytest
import torch

from specssm.reference import materialize_ref
from specssm.reference.storage import encode_state
from specssm.step.reference import sr_bits
from tests.helpers.slots import bits, random_cache


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("rounding", ["rn", "sr"])
def test_stores_the_encoded_implied_state(state_dtype, rounding):
    cache, A = random_cache(slots=6, state_dtype=state_dtype, pnat=[16, 3, 0, 9, 0, 0],
                            ring_start=[19, 0, 5, 14, 0, 0], seed=21)
    before = copy.deepcopy(cache)
    src, dst = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 5, 2])     # pair 3 writes slot 2, pair 2 reads it
    with pytest.raises(ValueError, match=r"^dst_slots: expected no pair to write another pair's source"):
        materialize_ref(cache, src, dst, A, rounding=rounding)
    dst = torch.tensor([4, 1, 5, cache.pad_slot_id])
    folded = materialize_ref(cache, src, dst, A, rounding=rounding)
    assert sorted(folded) == [1, 4, 5]
    for s, d in ((0, 4), (1, 1), (2, 5)):
        for layer, lc in enumerate(cache.layers):
            h = before.implied_state(layer, s, A[layer])
            assert torch.equal(folded[d][layer], h)
            rb = sr_bits(int(before.seeds[d]), d, tuple(h.shape)) if rounding == "sr" else None
            q, scale = encode_state(h, state_dtype, rounding, rb)
            assert torch.equal(bits(lc.state[d]), bits(q))
            if scale is not None:
                assert torch.equal(lc.state_scale[d], scale)
        assert int(cache.pnat[d]) == 0 and int(cache.seeds[d]) == int(before.seeds[d]) + 1
        assert int(cache.ring_start[d]) == (int(before.ring_start[s]) + int(before.pnat[s])) % cache.L
    for lc, l0 in zip(cache.layers, before.layers):       # slot 3, the pad pair's source, is untouched
        assert torch.equal(bits(lc.state[3]), bits(l0.state[3]))
