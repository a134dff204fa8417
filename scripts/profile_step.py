"""One checkpointing step at Super TP8 shapes (mixed pnat), for Nsight Compute:

    ncu -k regex:'coef_kernel|main_kernel' --launch-skip 6 --launch-count 3 --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section WarpStateStats python3 scripts/profile_step.py [int8]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specssm.bench.mix import DEFAULT_ACCEPTANCE, sample_pnat
from specssm.bench.runner import fill_state
from specssm.cache import SSMCache, StepPlan
from specssm.ops import checkpointing_ssu


def main(batch=1024, state=torch.float32):
    H, P, N, G, T, W = 16, 64, 128, 1, 6, 16
    dev = torch.device("cuda")
    cache = SSMCache(1, batch, H, P, N, G, T, W, state_dtype=state, act_dtype=torch.bfloat16, device=dev)
    lc = cache.layers[0]
    fill_state(lc.state, lc.state_scale)
    lc.x_cache.normal_()
    lc.B_cache.normal_()
    lc.dt_cache.uniform_(0.01, 0.1)
    cache.pnat.copy_(torch.from_numpy(sample_pnat("mixed", batch, DEFAULT_ACCEPTANCE, T, W)).to(dev))
    x = torch.randn(batch, T, H, P, device=dev, dtype=torch.bfloat16)
    Bm = torch.randn(batch, T, G, N, device=dev, dtype=torch.bfloat16)
    sbi = torch.arange(batch, dtype=torch.int32, device=dev)
    plan = StepPlan(batch, dev).build(cache.pnat, sbi, W, T)
    A = -torch.rand(H, device=dev).add(0.1)
    for _ in range(3):
        checkpointing_ssu(x=x, dt=torch.randn(batch, T, H, device=dev), A=A, B=Bm, C=torch.randn_like(Bm),
                          out=torch.empty_like(x), D=torch.randn(H, device=dev), dt_bias=torch.zeros(H, device=dev),
                          dt_softplus=True, state_batch_indices=sbi, plan=plan, launch="split", validate=False,
                          **cache.op_kwargs(0))
    torch.cuda.synchronize()
    print("writes", int(plan.counts[0]), "of", batch)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    main(state=getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}.get(name, name)))
