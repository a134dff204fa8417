"""Programmatic Dependent Launch between the conv update and the SSM step: the option reaches only the
Triton ops, and changes no bit of the outputs or caches (CPU: the interpreter ignores it; GPU: real)."""
import functools

import pytest
import torch

from specssm.model import Mamba2Config, Mamba2Mixer, ModelCache, resolve_conv, resolve_ssu
from specssm.model.mixer import init_mixer_params

CFG = Mamba2Config(d_model=32, n_layers=1, nheads=4, head_dim=8, d_state=8, ngroups=2, d_conv=4)


def test_pdl_is_bound_to_the_triton_ops_only():
    conv, name = resolve_conv("triton", pdl=True)
    assert conv.keywords == {"pdl": True} and "pdl" in name
    ssu, name = resolve_ssu("op", pdl=True)
    assert ssu.keywords["pdl"] is True and "pdl" in name
    assert "pdl" not in resolve_ssu("op")[0].keywords            # off: the op's own default
    assert not isinstance(resolve_conv("triton")[0], functools.partial)
    for fn, _ in (resolve_ssu("reference", pdl=True), resolve_conv("torch", pdl=True)):
        assert not isinstance(fn, functools.partial)


@pytest.mark.interpreter
def test_mixer_decode_with_pdl_is_bit_identical():
    """Verify steps with commits in between (padding row included): outputs and caches equal bit for bit."""
    T, batch = 3, 3
    mixer = Mamba2Mixer(CFG, init_mixer_params(CFG, torch.Generator().manual_seed(0)), 0, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    hidden = [torch.randn(batch, T, CFG.d_model, generator=gen).to(torch.bfloat16) for _ in range(3)]
    accepted = [torch.randint(1, T + 1, (batch,), generator=gen, dtype=torch.int32) for _ in range(3)]
    runs = []
    for pdl in (False, True):
        cache = ModelCache(CFG, 4, T, 4, torch.float32, torch.bfloat16)   # W=4: rows flush too
        slots = cache.allocate(batch)
        slots[1] = cache.pad_slot_id
        ssu, _ = resolve_ssu("op", "cpu", "exact", True, torch.bfloat16, pdl)
        conv, _ = resolve_conv("triton", "cpu", torch.bfloat16, pdl)
        outs = []
        for h, acc in zip(hidden, accepted):
            outs.append(mixer.step(h, cache, slots, ssu, conv))
            cache.commit(slots, acc, T)
        lc = cache.ssm.layers[0]
        runs.append([*outs, lc.state, lc.x_cache, lc.B_cache, lc.dt_cache, cache.conv_states[0]])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_conv_then_step_with_pdl_is_bit_identical(batch):
    """conv1d_update -> checkpointing_ssu (x, B, C views of the conv output), captured in a CUDA graph
    over rotating slot sets, with and without pdl on both: identical outputs and caches after the
    same replays (specssm/bench/pdl.py, which scripts/pdl_check.py times). On cards below sm_90 pdl is
    a no-op."""
    from specssm.bench.pdl import Chain, measure
    sets = 3
    _, _, differ = measure(Chain(batch, sets, T=6, W=16), sets, reps=3, rounds=1)
    assert not differ, f"differ with pdl: {differ}"
