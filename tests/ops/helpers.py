"""Random steps on the ring contract, shared by the op tests."""
from __future__ import annotations

import torch

from specssm.cache import SSMCache
from specssm.sim import random_params


def make_step(*, batch=3, H=4, P=16, N=16, G=2, T=4, W=16, slots=None, act=torch.bfloat16,
              state_dtype=torch.float32, pnat=None, pad_rows=(), strategy="checkpointing", seed=0,
              device="cpu", use_z=True, varlen_lens=None):
    """A cache with random checkpoint, history and ring position per slot, and random step inputs.

    pnat: None (random in [0, W]) or a list per row. Returns (cache, inputs dict, sbi, params)."""
    gen = torch.Generator().manual_seed(seed)
    slots = slots or batch + 2
    cache = SSMCache(1, slots, H, P, N, G, T, W, state_dtype=state_dtype, act_dtype=act,
                     strategy=strategy)
    lc = cache.layers[0]
    cap = max(cache.W, T)
    if strategy != "all_states":
        lc.state.copy_(torch.randn(lc.state.shape, generator=gen).to(state_dtype))
        lc.x_cache.copy_(torch.randn(lc.x_cache.shape, generator=gen).to(act))
        lc.B_cache.copy_(torch.randn(lc.B_cache.shape, generator=gen).to(act))
        lc.dt_cache.copy_(torch.rand(lc.dt_cache.shape, generator=gen) * 0.5 + 0.01)
        cache.ring_start.copy_(torch.randint(0, cache.L, (slots,), generator=gen, dtype=torch.int32))
        cache.pnat.copy_(torch.randint(0, cap + 1, (slots,), generator=gen, dtype=torch.int32))
    else:
        lc.state.copy_(torch.randn(lc.state.shape, generator=gen).to(state_dtype))
        cache.state_index.copy_(torch.randint(0, T, (slots,), generator=gen, dtype=torch.int32))
    perm = torch.randperm(slots, generator=gen)[:batch].to(torch.int32)
    for r in pad_rows:
        perm[r] = cache.pad_slot_id
    if pnat is not None:
        for r, k in enumerate(pnat):
            if int(perm[r]) != cache.pad_slot_id:
                cache.pnat[int(perm[r])] = k
    A, D, dt_bias = random_params(H, P, N, G, gen, torch.float32)
    if varlen_lens is None:
        lead = (batch, T)
        cu = None
    else:
        cu = torch.tensor([0] + list(torch.tensor(varlen_lens).cumsum(0)), dtype=torch.int32)
        lead = (int(cu[-1]),)
    x = torch.randn(lead + (H, P), generator=gen).to(act)
    inputs = dict(
        x=x, dt=torch.randn(lead + (H,), generator=gen)[..., None].expand(lead + (H, P)),
        A=A, B=torch.randn(lead + (G, N), generator=gen).to(act), C=torch.randn(lead + (G, N), generator=gen).to(act),
        out=torch.full_like(x, float("nan")), D=D, z=torch.randn(lead + (H, P), generator=gen).to(act) if use_z else None,
        dt_bias=dt_bias, dt_softplus=True, state_batch_indices=perm, pad_slot_id=cache.pad_slot_id)
    if cu is not None:
        inputs.update(cu_seqlens=cu, max_seqlen=T)
    return cache, inputs


def clone_cache(cache):
    import copy
    c = copy.deepcopy(cache)
    return c


def to_device(cache, inputs, device):
    import copy
    c = copy.deepcopy(cache)
    for name in ("_ring_start", "_pnat", "_seeds", "_state_index"):
        setattr(c, name, getattr(c, name).to(device))
    S = c.num_slots
    c.ring_start, c.pnat, c.seeds, c.state_index = c._ring_start[:S], c._pnat[:S], c._seeds[:S], c._state_index[:S]
    c.faults = c.faults.to(device)
    for lc in c.layers:
        for f in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            t = getattr(lc, f)
            if t is not None:
                setattr(lc, f, t.to(device))
    c.device = torch.device(device)
    ins = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ins["dt"] = inputs["dt"][..., 0].to(device)[..., None].expand(inputs["dt"].shape)
    for k in ("A", "D", "dt_bias"):
        v = inputs[k]
        idx = (slice(None),) + (0,) * (v.dim() - 1)
        ins[k] = v[idx].to(device).reshape((-1,) + (1,) * (v.dim() - 1)).expand(v.shape)
    return c, ins
