"""The conv1d update -> SSM step chain with and without Programmatic Dependent Launch (GPU, sm_90+):
`Chain` holds caches and inputs of rotating slot sets, `measure` times it both ways and names the
tensors whose bits differ after the same replays. scripts/pdl_check.py prints and saves a sweep over
batches; tests/model/test_model_pdl.py checks the bits on a GPU. Super TP8 shapes, bf16 activations,
fp32 state; the step reads x, B, C as views of the conv output, as the model does.
"""
from __future__ import annotations

import functools
import math

import torch

from specssm.bench.mix import DEFAULT_ACCEPTANCE, sample_pnat
from specssm.bench.timing import capture_graph, time_graph_events
from specssm.cache import SSMCache, StepPlan
from specssm.conv import conv1d_update
from specssm.ops import checkpointing_ssu

H, P, N, G, D_CONV = 16, 64, 128, 1, 4          # Super TP8
CONV_DIM = H * P + 2 * G * N
BF16 = torch.bfloat16


class Chain:
    """Caches and inputs of `sets` disjoint slot sets of `batch` rows; `run(pdl)` does one conv + step
    per set. Inputs are shared by the sets (hot), states are not (cold)."""

    def __init__(self, batch, sets, T, W, seed=0, device="cuda"):
        dev = torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        slots = batch * sets
        self.cache = cache = SSMCache(1, slots, H, P, N, G, T, W, state_dtype=torch.float32, act_dtype=BF16,
                                      device=dev)
        lc = cache.layers[0]
        lc.state.normal_()
        lc.x_cache.normal_()
        lc.B_cache.normal_()
        lc.dt_cache.uniform_(0.01, 0.1)
        cache.pnat.copy_(torch.from_numpy(sample_pnat("mixed", slots, DEFAULT_ACCEPTANCE, T, cache.W, seed)).to(dev))
        cache.ring_start.copy_(torch.randint(0, cache.L, (slots,), dtype=torch.int32, generator=gen).to(dev))
        self.conv_state = torch.randn(slots, D_CONV - 1 + T, CONV_DIM, device=dev).to(BF16)
        # the context sits where the last step's acceptance (1..T) left it
        self.conv_offset = torch.randint(1, T + 1, (slots,), dtype=torch.int32, generator=gen).to(dev)
        self.conv_weight = torch.randn(CONV_DIM, D_CONV, device=dev).mul_(0.3).to(BF16)
        self.conv_bias = torch.randn(CONV_DIM, device=dev).mul_(0.1).to(BF16)
        self.xBC_in = torch.randn(batch, T, CONV_DIM, device=dev).to(BF16)     # the in_proj columns
        self.xBC = torch.empty_like(self.xBC_in)                                # conv output
        x, B, C = torch.split(self.xBC, [H * P, G * N, G * N], dim=-1)          # views, as in the model
        dt = torch.randn(batch, T, H, device=dev).to(BF16)
        self.y = torch.empty(batch, T, H, P, dtype=BF16, device=dev)
        A = -torch.rand(H, device=dev).add(0.1)
        D, dt_bias = torch.randn(H, device=dev), torch.rand(H, device=dev) - 3
        self.ssu_kw = dict(
            **cache.op_kwargs(0), x=x.view(batch, T, H, P), dt=dt[..., None].expand(batch, T, H, P),
            A=A[:, None, None].expand(H, P, N), B=B.view(batch, T, G, N), C=C.view(batch, T, G, N), out=self.y,
            D=D[:, None].expand(H, P), z=None, dt_bias=dt_bias[:, None].expand(H, P), dt_softplus=True,
            validate=False)
        perm = torch.randperm(slots, generator=gen).to(torch.int32).to(dev)
        self.sets = [perm[i * batch:(i + 1) * batch] for i in range(sets)]
        self.plans = [StepPlan(batch, dev).build(cache.pnat, s, cache.W, T) for s in self.sets]

    def run(self, pdl: bool):
        for sbi, plan in zip(self.sets, self.plans):
            conv1d_update(self.xBC_in, self.conv_state, self.conv_offset, self.conv_weight, self.conv_bias,
                          "silu", sbi, out=self.xBC, pdl=pdl)
            checkpointing_ssu(**self.ssu_kw, state_batch_indices=sbi, plan=plan, pdl=pdl)

    def written(self) -> dict:
        """Every tensor the chain writes."""
        lc = self.cache.layers[0]
        return dict(y=self.y, conv_out=self.xBC, conv_state=self.conv_state, state=lc.state,
                    x_cache=lc.x_cache, B_cache=lc.B_cache, dt_cache=lc.dt_cache)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def measure(chain: Chain, sets: int, reps: int, rounds: int):
    """Best-of-rounds µs per step for pdl off / on (rounds alternate the two, so drift hits both), and
    the names of the written tensors that differ between them after the same replays."""
    start = {k: v.clone() for k, v in chain.written().items()}
    best, final = {False: math.inf, True: math.inf}, {}
    for _ in range(rounds):
        for pdl in (False, True):
            for k, v in chain.written().items():
                v.copy_(start[k])
            graph = capture_graph(functools.partial(chain.run, pdl))
            best[pdl] = min(best[pdl], time_graph_events(graph, sets, min_samples=reps * sets).median_us)
            del graph
            torch.cuda.synchronize()
            final[pdl] = {k: v.clone() for k, v in chain.written().items()}
    differ = [k for k in start if not same_bits(final[False][k], final[True][k])]
    return best[False], best[True], differ
