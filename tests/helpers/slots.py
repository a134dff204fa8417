"""Random multi-layer caches for the slot operations (materialize, fork, export / import)."""
from __future__ import annotations

import torch

from specssm.cache import SSMCache
from specssm.reference.storage import encode_state


def random_cache(*, layers=2, slots=8, H=2, P=16, N=32, G=1, T=4, W=16, state_dtype=torch.float32,
                 act=torch.bfloat16, pnat=None, ring_start=None, seed=0):
    """A cache with random checkpoints (encoded from random fp64 states, so quantized kinds get real
    scales), rings, ring positions and seeds, and per-layer A (H,) fp32 < 0, different per layer.

    pnat / ring_start: None (random in [0, max(W, T)] / [0, L)) or a list over the slots.
    Returns (cache, A list)."""
    gen = torch.Generator().manual_seed(seed)
    cache = SSMCache(layers, slots, H, P, N, G, T, W, state_dtype=state_dtype, act_dtype=act)
    for lc in cache.layers:
        q, scale = encode_state(torch.randn(slots, H, P, N, generator=gen), state_dtype)
        lc.state.copy_(q)
        if scale is not None:
            lc.state_scale.copy_(scale)
        lc.x_cache.copy_(torch.randn(lc.x_cache.shape, generator=gen).to(act))
        lc.B_cache.copy_(torch.randn(lc.B_cache.shape, generator=gen).to(act))
        lc.dt_cache.copy_(torch.rand(lc.dt_cache.shape, generator=gen) * 0.5 + 0.01)
    cap = max(cache.W, T)
    cache.pnat.copy_(torch.tensor(pnat, dtype=torch.int32) if pnat is not None
                     else torch.randint(0, cap + 1, (slots,), generator=gen, dtype=torch.int32))
    cache.ring_start.copy_(torch.tensor(ring_start, dtype=torch.int32) if ring_start is not None
                           else torch.randint(0, cache.L, (slots,), generator=gen, dtype=torch.int32))
    cache.seeds.copy_(torch.randint(0, 2 ** 40, (slots,), generator=gen))
    A = [-(torch.rand(H, generator=gen) * 0.9 + 0.1) * (i + 1) for i in range(layers)]
    return cache, A


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor as comparable bits (fp8 has no comparison ops; NaN != NaN)."""
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def cache_bits(cache) -> list:
    """Copies of every tensor of the cache as bits (per-slot arrays with their scratch entries)."""
    return [bits(t).clone() for t in cache.tensors()]      # the fault record included


def assert_same_bits(before: list, cache, what="cache") -> None:
    for i, (a, b) in enumerate(zip(before, cache_bits(cache))):
        assert torch.equal(a, b.to(a.device)), f"{what}: tensor {i} of cache.tensors() changed"


def poison_slots(cache, slots) -> None:
    """NaN (float states), 0x7F codes (NaN in fp8 e4m3, 127 in int8) and NaN scales in `slots`."""
    idx = torch.as_tensor(slots, dtype=torch.int64)
    for lc in cache.layers:
        if lc.state.element_size() == 1:
            lc.state.view(torch.uint8)[idx] = 0x7F
        else:
            lc.state[idx] = float("nan")
        if lc.state_scale is not None:
            lc.state_scale[idx] = float("nan")


def grid_step(v: torch.Tensor, dtype, scale=None) -> torch.Tensor:
    """The spacing of `dtype`'s grid at magnitude |v| (float64), in state units: the codes' spacing times
    the row scale for the scaled kinds."""
    if dtype == torch.float32:
        mant, emin = 23, -126
    elif dtype in (torch.int8, torch.int16):
        return torch.ones_like(v) * (1.0 if scale is None else scale)
    else:
        mant, emin = {torch.float8_e4m3fn: (3, -6), torch.bfloat16: (7, -126), torch.float16: (10, -14)}[dtype]
    s = 1.0 if scale is None else scale
    e = torch.floor(torch.log2((v.abs() / s).clamp_min(2.0 ** -149))).clamp_min(emin)
    return torch.exp2(e - mant) * s
