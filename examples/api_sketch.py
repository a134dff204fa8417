"""The README's API sketch as a script: a cache, one verify step of checkpointing replay through every
layer, the commit. Each layer's step is checked against the float64 reference (examples/_verify.py).

    TRITON_INTERPRET=1 python examples/api_sketch.py      # CPU (Triton interpreter), small sizes
    python examples/api_sketch.py                          # GPU, Nemotron-3-Super TP8 sizes (--small: CPU sizes)

The blocks between `# [readme]` and `# [/readme]` are the README's sketch, verbatim (tests/test_examples.py).
"""
from __future__ import annotations

import argparse

import torch
from _verify import Mirror

from specssm import SSMCache, StepPlan, checkpointing_ssu


def run(H, P, N, G, T, layers, batch, num_slots, device):
    # [readme]
    cache = SSMCache(num_layers=layers, num_slots=num_slots, nheads=H, head_dim=P, d_state=N, ngroups=G,
                     max_tokens=T, window=16, state_dtype=torch.float32, act_dtype=torch.bfloat16, device=device)
    slots = cache.allocate(batch)                      # fresh slots: pnat 0, ring_start 0
    for layer in range(layers):                        # prefill's last states (random here)
        cache.write_state(layer, slots, torch.randn(batch, H, P, N, device=device))

    # one verify step's inputs per layer, in the mamba convention (what a Mamba2 mixer hands the step):
    # x, z, out (batch, T, H, P) and B, C (batch, T, G, N) in the activation dtype; dt (batch, T, H, P)
    # fp32 raw dt tied over P (stride 0); A (H, P, N), D and dt_bias (H, P) fp32 tied per head, A < 0
    act, f32 = torch.bfloat16, torch.float32
    x = torch.randn(layers, batch, T, H, P, device=device).to(act)
    z = torch.randn(layers, batch, T, H, P, device=device).to(act)
    B = torch.randn(layers, batch, T, G, N, device=device).to(act)
    C = torch.randn(layers, batch, T, G, N, device=device).to(act)
    dt = torch.randn(layers, batch, T, H, 1, device=device, dtype=f32).expand(layers, batch, T, H, P)
    A = (-torch.rand(H, 1, 1, device=device) - 0.1).expand(H, P, N)
    D = torch.randn(H, 1, device=device).expand(H, P)
    dt_bias = (torch.rand(H, 1, device=device) - 3.0).expand(H, P)
    out = torch.empty_like(x)
    # [/readme]
    mirror = Mirror(cache)
    mirror.sync(cache)
    # [readme]

    plan = StepPlan(max_batch=num_slots, device=device).build(cache.pnat, slots, cache.W, T)   # once per step
    for layer in range(layers):
        checkpointing_ssu(x=x[layer], dt=dt[layer], A=A, B=B[layer], C=C[layer], out=out[layer], D=D,
                          z=z[layer], dt_bias=dt_bias, dt_softplus=True, state_batch_indices=slots, plan=plan,
                          validate=False, **cache.op_kwargs(layer))
        # [/readme]
        ref = mirror.step(layer, x=x[layer], dt=dt[layer], A=A, B=B[layer], C=C[layer], out=out[layer], D=D,
                          z=z[layer], dt_bias=dt_bias, dt_softplus=True, state_batch_indices=slots)
        err = mirror.compare(cache, layer, out[layer], ref)
        print(f"layer {layer}: outputs within {err['out']:.1e} (relative RMS) of the float64 reference")
        # [readme]

    # after verification: accepted tokens per row in [1, T], on the device, no host sync (CUDA-graph safe)
    accepted = torch.randint(1, T + 1, (batch,), dtype=torch.int32, device=device)
    cache.commit(slots, accepted, validate=False)
    # [/readme]
    assert cache.pnat[slots.long()].tolist() == accepted.tolist()     # no row flushed: pnat 0 + accepted
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="the CPU sizes on any device")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.device.startswith("cuda") and not a.small:      # Nemotron-3-Super per TP8 rank, 5 draft tokens
        sizes = dict(H=16, P=64, N=128, G=1, T=6, layers=4, batch=8, num_slots=256)
    else:
        sizes = dict(H=4, P=16, N=32, G=2, T=4, layers=2, batch=3, num_slots=8)
    run(**sizes, device=a.device)
    print(f"api_sketch: OK ({sizes['layers']} layers x {sizes['batch']} rows on {a.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
