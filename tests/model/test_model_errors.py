"""Bad slot values on the model path: `TinyMamba2LM.step` (validate=True) and `ModelCache.commit` reject
them before any layer writes, naming the argument, the row, the slot and the value."""
import pytest
import torch

from specssm.model import SIZES, TinyMamba2LM

TINY = SIZES["tiny"]


def setup(T=3, window=4):
    model = TinyMamba2LM(TINY, seed=4, dtype=torch.float32, ssu="reference", conv="torch")
    cache = model.new_cache(4, T, window=window)
    for s in (2, 0):
        model.prefill(torch.arange(5) + s, cache, s)
    slots = torch.tensor([2, cache.pad_slot_id, 0], dtype=torch.int32)
    tokens = torch.randint(0, 256, (3, T), generator=torch.Generator().manual_seed(1))
    return model, cache, slots, tokens


def cache_bits(cache) -> dict:
    d = {"conv_offset": cache.conv_offset.clone(), "ring_start": cache.ssm.ring_start.clone(),
         "pnat": cache.ssm.pnat.clone(), "seeds": cache.ssm.seeds.clone()}
    for i, cs in enumerate(cache.conv_states):
        d[f"conv_state[{i}]"] = cs.clone()
    for i, lc in enumerate(cache.ssm.layers):
        for nm in ("state", "x_cache", "B_cache", "dt_cache"):
            d[f"{nm}[{i}]"] = getattr(lc, nm).clone()
    return d


def rejected(fn, name):
    with pytest.raises(ValueError) as e:
        fn()
    assert str(e.value).startswith(f"{name}:"), e.value
    return str(e.value)


@pytest.mark.parametrize("field,value,name", [("pnat", 5, "cache.ssm.pnat"), ("pnat", -1, "cache.ssm.pnat"),
                                              ("ring_start", 7, "cache.ssm.ring_start")])
def test_step_rejects_bad_ring_values_before_the_first_layer(field, value, name):
    """W = 4, T = 3: pnat in [0, 4], ring_start in [0, 7). Checked before the first conv writes."""
    model, cache, slots, tokens = setup()
    getattr(cache.ssm, field)[0] = value                         # slot 0 is row 2
    before = cache_bits(cache)
    msg = rejected(lambda: model.step(tokens, cache, slots), name)
    assert f"got {value} for slot 0 (row 2)" in msg
    after = cache_bits(cache)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    getattr(cache.ssm, field)[3] = value                          # slot 3 is free: not checked
    getattr(cache.ssm, field)[0] = 0
    assert torch.isfinite(model.step(tokens, cache, slots)[[0, 2]]).all()


def test_step_rejects_bad_slots_before_the_first_layer():
    model, cache, slots, tokens = setup()
    before = cache_bits(cache)
    msg = rejected(lambda: model.step(tokens, cache, torch.tensor([2, -1, 4], dtype=torch.int32)), "slots")
    assert "got 4 at row 2" in msg
    rejected(lambda: model.step(tokens, cache, torch.tensor([2, 2, 0], dtype=torch.int32)), "slots")
    after = cache_bits(cache)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_validate_false_skips_the_host_checks():
    """validate=False (CUDA graphs): no host check on the model path; the reference op behind it still
    checks (it always does), so the step fails there, after the first conv."""
    model, cache, slots, tokens = setup()
    model.set_ops("reference", "torch", validate=False)
    cache.ssm.pnat[0] = 5
    rejected(lambda: model.step(tokens, cache, slots), "prev_num_accepted_tokens")


@pytest.mark.parametrize("accepted", [0, 4])
def test_commit_rejects_accepted_outside_1_to_T(accepted):
    model, cache, slots, tokens = setup()
    model.step(tokens, cache, slots)
    before = cache_bits(cache)
    msg = rejected(lambda: cache.commit(slots, torch.tensor([1, 1, accepted], dtype=torch.int32), 3), "accepted")
    assert f"expected values in [1, 3] (tokens of the row), got {accepted} at row 2 (slot 0)" in msg
    after = cache_bits(cache)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
