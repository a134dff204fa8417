"""Quick device timing of the step ops (graph replay over rotating slot sets, event timing).

The full method (CUPTI spans, plots) is `specssm bench`; this is the fast loop used while tuning.
usage: python scripts/quick_bench.py [--batches 1,8,64,256,1024] [--shape super_tp8] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specssm.cache import SSMCache, StepPlan  # noqa: E402
from specssm.ops import all_states_ssu, always_write_ssu, checkpointing_ssu  # noqa: E402

SHAPES = {"super_tp8": (16, 64, 128, 1), "tp1": (128, 64, 128, 8)}
HIST = {1: 539622, 2: 329144, 3: 336224, 4: 495832, 5: 444398, 6: 1007008}


def stationary_pnat(T, W, hist, gen, n):
    """Sample pnat from the chain pnat' = acc if pnat + T > W else pnat + acc (long run)."""
    p = torch.tensor([hist.get(a, 0) for a in range(1, T + 1)], dtype=torch.float64)
    acc = torch.multinomial(p / p.sum(), 200 * n + 1000, replacement=True, generator=gen) + 1
    k, out = 0, []
    for i, a in enumerate(acc.tolist()):
        k = a if k + T > W else k + a
        if i >= 1000 and i % 200 == 0:
            out.append(k)
    return torch.tensor(out[:n], dtype=torch.int32)


def fill_state(state):
    """Random contents for a state pool: normal values through fp32 (fp8 tensors have no normal_),
    integer codes in [-100, 100)."""
    if state.dtype.is_floating_point:
        state.copy_(torch.randn(state.shape, device=state.device))
    else:
        state.random_(-100, 100)


def copy_bandwidth():
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (s.elapsed_time(e) * 1e-3)


def step_bytes(batch, H, P, N, G, T, pnat, writes, state_bytes, act=2, all_states=False):
    io = batch * T * (3 * H * P * act + 2 * G * N * act + H * 4)        # x, z, out; B, C; dt
    if all_states:
        return io + batch * (1 + T) * H * P * N * state_bytes
    hist = int(pnat.sum()) * (H * P + G * N) * act + 4 * H * int(pnat.sum())
    app = batch * T * (H * P + G * N) * act + batch * T * H * 4
    return io + hist + app + (batch + writes) * H * P * N * state_bytes


def time_graph(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def report_kernels():
    """Registers, spills and shared memory of every compiled variant of the step kernels."""
    from specssm.step import launch
    for kernel in (launch.fused_kernel, launch.coef_kernel, launch.main_kernel):
        for dev, caches in getattr(kernel, "device_caches", {}).items():
            for key, k in caches[0].items():
                md = k.metadata
                print(f"{kernel.fn.__name__} regs {k.n_regs:4d} spills {k.n_spills:5d} shared {md.shared:6d} "
                      f"warps {md.num_warps} | {str(key)[-160:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64,256,1024")
    ap.add_argument("--shape", default="super_tp8")
    ap.add_argument("--state", default="float32")
    ap.add_argument("--T", type=int, default=6)
    ap.add_argument("--W", type=int, default=16)
    ap.add_argument("--modes", default="dyn_rect,split_rect,split_replay,always_write,all_states")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", default=None, help="JSON list of tuning overrides to try, e.g. '[{\"num_warps\": 8}]'")
    ap.add_argument("--pnat", default="mixed", choices=["mixed", "nowrite", "write"])
    ap.add_argument("--rounding", default="rn", choices=["rn", "sr"])
    a = ap.parse_args()
    H, P, N, G = SHAPES[a.shape]
    T, W = a.T, a.W
    sdt = getattr(torch, a.state)
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"# {torch.cuda.get_device_name(0)}  copy {bw / 1e12:.2f} TB/s  {a.shape} T={T} W={W} state={a.state}")
    from specssm.step import tuning
    sweep = json.loads(a.sweep) if a.sweep else [{}]
    for batch, ov in [(int(b), o) for b in a.batches.split(",") for o in sweep]:
        tuning.OVERRIDE.clear(); tuning.OVERRIDE.update(ov)
        sbytes = torch.tensor([], dtype=sdt).element_size()
        per_set = batch * H * P * N * sbytes
        sets = max(1, min(32, math.ceil(4 * l2 / per_set)))
        for mode in a.modes.split(","):
            strategy = {"always_write": "always_write", "all_states": "all_states"}.get(mode, "checkpointing")
            if strategy == "all_states" and sdt not in (torch.float32, torch.bfloat16, torch.float16):
                continue
            cache = SSMCache(1, batch * sets, H, P, N, G, T, W, state_dtype=sdt, act_dtype=torch.bfloat16,
                             device=dev, strategy=strategy)
            lc = cache.layers[0]
            fill_state(lc.state)
            if lc.x_cache is not None:
                lc.x_cache.normal_(); lc.B_cache.normal_(); lc.dt_cache.uniform_(0.01, 0.1)
            pn = stationary_pnat(T, cache.W if strategy == "checkpointing" else 0, HIST, gen, batch * sets)
            if strategy == "always_write":
                pn = stationary_pnat(T, W, {k: v for k, v in HIST.items()}, gen, batch * sets).clamp(max=T)
            if a.pnat != "mixed" and strategy == "checkpointing":
                pn = torch.full_like(pn, 0 if a.pnat == "nowrite" else W)
            cache.pnat.copy_(pn.to(dev))
            cache.ring_start.copy_(torch.randint(0, cache.L, (batch * sets,), dtype=torch.int32, generator=gen).to(dev))
            A = -torch.rand(H, device=dev).add(0.1)
            D, bias = torch.randn(H, device=dev), torch.rand(H, device=dev) - 3
            x = torch.randn(batch, T, H, P, device=dev, dtype=torch.bfloat16)
            z, out = torch.randn_like(x), torch.empty_like(x)
            Bm = torch.randn(batch, T, G, N, device=dev, dtype=torch.bfloat16)
            Cm = torch.randn_like(Bm)
            dt = torch.randn(batch, T, H, device=dev)
            sbis = [torch.arange(i * batch, (i + 1) * batch, dtype=torch.int32, device=dev) for i in range(sets)]
            plans = []
            for sbi in sbis:
                pl = StepPlan(batch, dev)
                pl.build(cache.pnat, sbi, cache.W, T)
                plans.append(pl)
            writes = int(sum(int(p.counts[0]) for p in plans)) / sets
            kw = dict(x=x, dt=dt[..., None].expand(batch, T, H, P), A=A[:, None, None].expand(H, P, N), B=Bm,
                      C=Cm, out=out, D=D[:, None].expand(H, P), z=z, dt_bias=bias[:, None].expand(H, P),
                      dt_softplus=True, validate=False)
            if a.rounding == "sr" and strategy != "all_states":
                kw.update(rounding="sr", rand_seed=cache.seeds)
            ck = cache.op_kwargs(0)

            def fn():
                for sbi, pl in zip(sbis, plans):
                    if mode == "all_states":
                        all_states_ssu(**{k: v for k, v in kw.items()}, state_batch_indices=sbi, **ck)
                    elif mode == "always_write":
                        always_write_ssu(**kw, state_batch_indices=sbi, **ck)
                    else:
                        launch, form = mode.split("_")
                        checkpointing_ssu(**kw, state_batch_indices=sbi, **ck, plan=pl,
                                          launch={"dyn": "dynamic"}.get(launch, launch),
                                          no_write_form={"rect": "rectangle"}[form] if form == "rect" else "replay")
            try:
                us = time_graph(fn) / sets
            except Exception as e:  # report and go on
                print(f"{mode} batch {batch}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            nb = step_bytes(batch, H, P, N, G, T, pn[:batch].double() if strategy != "all_states" else pn[:0],
                            writes if strategy == "checkpointing" else batch, sbytes,
                            all_states=strategy == "all_states")
            floor = nb / bw * 1e6
            rows.append(dict(batch=batch, mode=mode, us=us, floor_us=floor, pct=100 * floor / us, writes=writes, sets=sets))
            rows[-1]["cfg"] = ov
            print(f"{json.dumps(ov):52s} batch {batch:5d} {mode:14s} {us:9.2f} us  floor {floor:8.2f} us  {100 * floor / us:5.1f}%  writes {writes:.0f}/{batch}")
            del cache
            torch.cuda.empty_cache()
    report_kernels()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"quick_{a.shape}_{a.state}.json"), "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(0), copy_bw=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
