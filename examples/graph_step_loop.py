"""A serving loop: the whole verify step (plan, every layer's SSM step, commit) captured once in a CUDA
graph and replayed while the inputs, the accepted counts and the mix of flushing rows change, with a
padding row in the batch. On a CPU the same loop runs eagerly (no graphs). Every step is checked
against the float64 reference (examples/_verify.py).

    TRITON_INTERPRET=1 python examples/graph_step_loop.py     # CPU (Triton interpreter), small sizes
    python examples/graph_step_loop.py                         # GPU: CUDA graph, Nemotron-3-Super TP8 sizes
"""
from __future__ import annotations

import argparse

import torch
from _verify import Mirror

from specssm import SSMCache, StepPlan, checkpointing_ssu


def run(H, P, N, G, T, W, layers, batch, steps, device, graph):
    act, f32 = torch.bfloat16, torch.float32
    kw = dict(num_layers=layers, num_slots=batch + 2, nheads=H, head_dim=P, d_state=N, ngroups=G, max_tokens=T,
              window=W, state_dtype=torch.float32, act_dtype=act, device=device)
    cache = SSMCache(**kw)
    live = cache.allocate(batch)
    for layer in range(layers):
        cache.write_state(layer, live, torch.randn(batch, H, P, N, device=device))
    # the step's rows: the live slots and one padding row (pad_slot_id: it reads and writes nothing)
    pad = torch.tensor([cache.pad_slot_id], dtype=torch.int32, device=device)
    slots = torch.cat([live[:1], pad, live[1:]])
    rows = batch + 1
    A = (-torch.rand(layers, H, 1, 1, device=device) - 0.1).expand(layers, H, P, N)
    D = torch.randn(layers, H, 1, device=device).expand(layers, H, P)
    dt_bias = (torch.rand(layers, H, 1, device=device) - 3.0).expand(layers, H, P)

    # static buffers: a graph reads and writes the same addresses on every replay
    x, z = (torch.zeros(layers, rows, T, H, P, dtype=act, device=device) for _ in range(2))
    B, C = (torch.zeros(layers, rows, T, G, N, dtype=act, device=device) for _ in range(2))
    dt_raw = torch.zeros(layers, rows, T, H, 1, dtype=f32, device=device)
    dt = dt_raw.expand(layers, rows, T, H, P)
    out = torch.full((layers, rows, T, H, P), float("nan"), dtype=act, device=device)
    accepted = torch.ones(rows, dtype=torch.int32, device=device)
    plan = StepPlan(max_batch=rows, device=device)

    def layer_inputs(layer):
        return dict(x=x[layer], dt=dt[layer], A=A[layer], B=B[layer], C=C[layer], out=out[layer], D=D[layer],
                    z=z[layer], dt_bias=dt_bias[layer], dt_softplus=True, state_batch_indices=slots)

    def step(c):
        """One verify step on cache c: no host sync anywhere (validate=False), so it can be captured."""
        plan.build(c.pnat, slots, c.W, T, c.pad_slot_id, validate=False)
        for layer in range(layers):
            checkpointing_ssu(**layer_inputs(layer), plan=plan, validate=False, **c.op_kwargs(layer))
        c.commit(slots, accepted, validate=False)

    if graph:
        # compile and warm up on a throwaway cache of the same shapes (a warm-up is a real step), then
        # capture the step on the real cache: nothing runs during a capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(SSMCache(**kw))
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step(cache)
        run_step = g.replay
    else:
        def run_step():
            step(cache)

    mirror, gen, flushes = Mirror(cache), torch.Generator().manual_seed(1), 0
    for i in range(steps):
        # the step's new inputs and, for the commit, how many tokens each row will have accepted (an
        # engine knows this only after verification; the commit is in the graph all the same)
        for t in (x, z, B, C, dt_raw):
            t.copy_(torch.randn(t.shape, generator=gen))
        accepted.copy_(torch.randint(1, T + 1, (rows,), generator=gen, dtype=torch.int32))
        mirror.sync(cache)
        run_step()
        for layer in range(layers):
            ref = mirror.step(layer, **layer_inputs(layer))
            mirror.compare(cache, layer, out[layer], ref)
        pnat = mirror.cache.pnat[live.long().cpu()]
        flushes += int((pnat + T > W).sum())
        mirror.cache.commit(slots.cpu(), accepted.cpu())
        for name in ("pnat", "ring_start", "seeds"):
            assert torch.equal(getattr(cache, name).cpu(), getattr(mirror.cache, name)), f"step {i}: {name}"
        assert bool(out[:, 1].isnan().all()), "the padding row's outputs were written"
    assert flushes > 0, "no row flushed: the example should exercise both branches"
    return flushes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="the CPU sizes on any device")
    ap.add_argument("--steps", type=int, default=None, help="verify steps (default 4 on a CPU, 24 on a GPU)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = a.device.startswith("cuda")
    if cuda and not a.small:            # Nemotron-3-Super per TP8 rank, 5 draft tokens
        sizes = dict(H=16, P=64, N=128, G=1, T=6, W=16, layers=4, batch=8)
    else:                               # W = 8: rows flush from the second step on
        sizes = dict(H=4, P=16, N=16, G=2, T=4, W=8, layers=2, batch=3)
    steps = a.steps or (24 if cuda else 4)
    flushes = run(**sizes, steps=steps, device=a.device, graph=cuda)
    rows = steps * sizes["batch"]
    print(f"graph_step_loop: OK ({steps} steps{' replayed from one CUDA graph' if cuda else ', eager'}, "
          f"{sizes['layers']} layers, {flushes}/{rows} row-steps flushed, each checked against the reference)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
