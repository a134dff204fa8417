"""An int8 checkpoint (one fp32 scale per state row) written with stochastic rounding: a quarter of the
fp32 state's memory and traffic. The Philox random bits are keyed by per-slot seeds that the commit
advances on the device, so a run is reproducible and CUDA-graph replays draw fresh bits. Every step is
checked against the float64 reference drawing the same bits (examples/_verify.py), and the int8 cache
is compared with an fp32 one fed the same tokens.

    TRITON_INTERPRET=1 python examples/quantized_cache.py     # CPU (Triton interpreter), small sizes
    python examples/quantized_cache.py                         # GPU, Nemotron-3-Super TP8 sizes
"""
from __future__ import annotations

import argparse

import torch
from _verify import Mirror

from specssm import SSMCache, checkpointing_ssu


def run(H, P, N, G, T, W, batch, steps, device):
    act = torch.bfloat16
    caches = {dt: SSMCache(num_layers=1, num_slots=batch, nheads=H, head_dim=P, d_state=N, ngroups=G, max_tokens=T,
                           window=W, state_dtype=dt, act_dtype=act, device=device, base_seed=7)
              for dt in (torch.int8, torch.float32)}
    q = caches[torch.int8]
    h0 = torch.randn(batch, H, P, N, device=device)
    for c in caches.values():
        slots = c.allocate(batch)
        c.write_state(0, slots, h0)                # int8: codes and per-row scales, rounded to nearest
    A = (-torch.rand(H, 1, 1, device=device) - 0.1).expand(H, P, N)
    D = torch.randn(H, 1, device=device).expand(H, P)
    dt_bias = (torch.rand(H, 1, device=device) - 3.0).expand(H, P)
    mirror, gen, writes, seeds0 = Mirror(q), torch.Generator().manual_seed(2), 0, q.seeds.clone()
    for i in range(steps):
        x = torch.randn(batch, T, H, P, generator=gen).to(device, act)
        z = torch.randn(batch, T, H, P, generator=gen).to(device, act)
        B = torch.randn(batch, T, G, N, generator=gen).to(device, act)
        C = torch.randn(batch, T, G, N, generator=gen).to(device, act)
        dt = torch.randn(batch, T, H, 1, generator=gen).to(device).expand(batch, T, H, P)
        inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                      state_batch_indices=slots)
        accepted = torch.randint(1, T + 1, (batch,), generator=gen, dtype=torch.int32).to(device)
        mirror.sync(q)
        writes += int((q.pnat + T > W).sum())
        outs = {}
        for dtype, c in caches.items():
            outs[dtype] = torch.empty_like(x)
            # int8 states need state_scale (in op_kwargs) and, for rounding="sr", the per-slot seeds
            sr = dict(rounding="sr", rand_seed=c.seeds) if dtype == torch.int8 else {}
            checkpointing_ssu(**inputs, out=outs[dtype], **sr, **c.op_kwargs(0))
            c.commit(slots, accepted)              # advances pnat / ring_start and the seeds
        ref = mirror.step(0, **inputs, out=outs[torch.int8], rounding="sr", rand_seed=q.seeds)
        err = mirror.compare(q, 0, outs[torch.int8], ref)
        drift = float((outs[torch.int8].double() - outs[torch.float32].double()).norm()
                      / outs[torch.float32].double().norm())
        stored = (f"{err['codes_moved']:.1%} of the written codes off the reference's by at most "
                  f"{err['state_codes']:.0f}" if "state_codes" in err else "no checkpoint written")
        print(f"step {i}: int8+SR outputs within {err['out']:.1e} of the reference, {stored}; "
              f"{drift:.1e} from the fp32 cache's outputs")
        assert drift < 0.05, f"step {i}: int8 checkpoint drifted {drift:.1e} from the fp32 one"
    assert writes > 0, "no checkpoint was written: the example should exercise int8 stores"
    assert torch.equal(q.seeds, seeds0 + steps)        # each commit advanced each row's seed by one
    return writes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="the CPU sizes on any device")
    ap.add_argument("--steps", type=int, default=None, help="verify steps (default 4 on a CPU, 16 on a GPU)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = a.device.startswith("cuda")
    if cuda and not a.small:
        sizes = dict(H=16, P=64, N=128, G=1, T=6, W=16, batch=8)
    else:                               # W = 8: rows flush (store int8 codes) from the second step on
        sizes = dict(H=4, P=16, N=32, G=1, T=4, W=8, batch=3)
    steps = a.steps or (16 if cuda else 4)
    writes = run(**sizes, steps=steps, device=a.device)
    print(f"quantized_cache: OK ({steps} steps, {writes} int8 checkpoint writes with stochastic rounding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
