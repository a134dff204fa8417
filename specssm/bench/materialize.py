"""`specssm bench --materialize`: time `materialize` (the ring fold of source slots into fresh checkpoints
of other slots) on a GPU, by default for 1,024 pairs, against its byte floor (benchmarks/README.md's method).

The sources' pnat are drawn from the stationary distribution of the commit chain (scenario "mixed"),
their ring positions at random. Each graph step materializes one slot set; the sets rotate so that the
states touched between two visits of a set exceed --cold-factor x L2 (state cold). Two figures per case,
medians of the CUPTI spans: `call_us`, the whole call (the pairs launch, one fold launch per layer,
the finish launch), and `kernel_us`, the fold kernels alone. The floor is the bytes that must move
(sources' states and ring rows read, destinations' states written, row scales) over the measured
device-to-device copy bandwidth. The pure parts (bytes, case list) run on a CPU; the results page of a
GPU run: benchmarks/results/<card>.md ("Materialize").
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from specssm.bench import cases as cs
from specssm.bench import mix

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
SCALED = ("int8", "fp8")
KERNEL = "materialize_kernel"


def fold_bytes(shape: cs.Shape, pnat, state_dtype: str, act_dtype: str = "bf16", layers: int = 1) -> int:
    """Bytes one materialize call must move: per pair and layer, the source's state read and the
    destination's written (H·P·N elements each, plus H·P fp32 row scales each way for int8 / fp8), and
    the source's k = pnat ring rows of x (H·P), B (G·N) in the activation dtype and dt (H fp32)."""
    H, P, N, G = shape.H, shape.P, shape.N, shape.G
    es, act = ELEMENT_BYTES[state_dtype], ELEMENT_BYTES[act_dtype]
    state = 2 * H * P * N * es + (2 * H * P * 4 if state_dtype in SCALED else 0)
    ring_tokens = int(np.sum(pnat))
    return layers * (len(pnat) * state + ring_tokens * ((H * P + G * N) * act + 4 * H))


def cases(args) -> list[dict]:
    """The (shape, state dtype, rounding, batch) cases of a run (batches: --batches, default 1024)."""
    return [dict(shape=cs.parse_shape(s), state_dtype=d, rounding=r, batch=b)
            for s in args.shapes for d in args.dtypes for r in args.rounding for b in args.materialize_batches]


def time_materialize(shape="super_tp8", batch=1024, state_dtype="bf16", rounding="rn", act_dtype="bf16",
                     layers=1, T=6, W=16, min_samples=100, cold_factor=4.0, max_sets=64, seed=0, hist=None,
                     copy_bw_bytes_per_s=None) -> dict:
    """Time materialize for `batch` source -> destination pairs on the current CUDA device; returns a
    row: sizes, call_us and kernel_us (medians over >= min_samples calls, CUDA-graph replays), their
    p10 / p90, bytes, floor_us, floor fraction of the kernels, slot sets and the cold factor reached."""
    import torch

    from specssm.bench.runner import torch_dtype
    from specssm.bench.timing import StepMarkers, capture_graph, copy_bandwidth, keep_named, stats, time_graph
    from specssm.cache import SSMCache
    from specssm.step.materialize import materialize
    dev = torch.device("cuda", torch.cuda.current_device())
    sh = shape if isinstance(shape, cs.Shape) else cs.parse_shape(shape)
    props = torch.cuda.get_device_properties(dev)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    gen = torch.Generator(device=dev).manual_seed(seed)
    per_set_state = batch * sh.H * sh.P * sh.N * ELEMENT_BYTES[state_dtype] * 2 * layers
    free, _ = torch.cuda.mem_get_info(dev)
    # sets x (states read and written per set) >= cold_factor x L2, within half the free memory
    sets = max(1, min(max_sets, math.ceil(cold_factor * l2 / per_set_state), int(0.5 * free // per_set_state)))
    pnat = mix.sample_pnat("mixed", sets * batch, hist or dict(mix.DEFAULT_ACCEPTANCE), T, W, seed)
    cache = SSMCache(layers, 2 * batch * sets, sh.H, sh.P, sh.N, sh.G, T, W, state_dtype=torch_dtype(state_dtype),
                     act_dtype=torch_dtype(act_dtype), device=dev)
    for lc in cache.layers:
        v = torch.randn(lc.state.shape, device=dev, generator=gen).mul_(20)
        lc.state.copy_((v.round().clamp_(-127, 127) if state_dtype == "int8" else v).to(lc.state.dtype))
        if lc.state_scale is not None:
            lc.state_scale.uniform_(0.01, 0.1, generator=gen)
        lc.x_cache.normal_(generator=gen)
        lc.B_cache.normal_(generator=gen)
        lc.dt_cache.uniform_(0.001, 0.1, generator=gen)
    src = torch.arange(2 * batch * sets, device=dev, dtype=torch.int32).view(sets, 2, batch)
    cache.pnat[src[:, 0].flatten().long()] = torch.as_tensor(pnat, device=dev)
    cache.ring_start.random_(0, cache.L, generator=gen)
    A = [-torch.rand(sh.H, device=dev, generator=gen) - 0.1 for _ in range(layers)]
    markers = StepMarkers(dev)

    def body():
        for i in range(sets):
            markers.begin()
            materialize(cache, src[i, 0], src[i, 1], A, rounding=rounding, validate=False)
            markers.end()

    graph = capture_graph(body)
    call, steps = time_graph(graph, sets, min_samples)
    kernel = stats(keep_named(steps, [KERNEL]))
    cache.raise_if_faulted()
    nbytes = fold_bytes(sh, pnat, state_dtype, act_dtype, layers) / sets
    bw = copy_bw_bytes_per_s or copy_bandwidth(dev, int(min(max(16 * l2, 512 * 2**20), free // 4)))[
        "copy_bw_bytes_per_s"]
    floor_us = nbytes / bw * 1e6
    return {"card": props.name, "shape": sh.name, "H": sh.H, "P": sh.P, "N": sh.N, "G": sh.G, "T": T, "W": W,
            "layers": layers, "batch": batch, "state_dtype": state_dtype, "act_dtype": act_dtype,
            "rounding": rounding, "mean_pnat": float(np.mean(pnat)), "call_us": call.median_us,
            "call_p10_us": call.p10_us, "call_p90_us": call.p90_us, "kernel_us": kernel.median_us,
            "kernel_p10_us": kernel.p10_us, "kernel_p90_us": kernel.p90_us, "samples": call.samples,
            "kernels_per_call": call.kernels_per_step, "bytes": int(nbytes), "floor_us": floor_us,
            "floor_fraction": floor_us / kernel.median_us, "slot_sets": sets,
            "cold_x_L2": round(sets * per_set_state / l2, 2)}


def table(rows) -> str:
    head = "| card | shape | state | rounding | batch | mean pnat | call µs | kernel µs | floor µs | floor / kernel |"
    out = [head, "|" + "---|" * 10]
    for r in rows:
        out.append(f"| {r['card']} | {r['shape']} | {r['state_dtype']} | {r['rounding']} | {r['batch']} | "
                   f"{r['mean_pnat']:.1f} | {r['call_us']:.1f} | {r['kernel_us']:.1f} | {r['floor_us']:.1f} | "
                   f"{r['floor_fraction']:.2f} |")
    return "\n".join(out) + "\n"


def run(args) -> int:
    """`specssm bench --materialize`: every case, a table on stdout and materialize.json in --out."""
    todo = cases(args)
    if args.dry_run:
        for c in todo:
            print(f"materialize {c['shape'].name} {c['state_dtype']} {c['rounding']} batch={c['batch']}")
        print(f"{len(todo)} cases", file=sys.stderr)
        return 0
    import torch

    from specssm.bench.timing import no_cuda
    if no_cuda("specssm bench --materialize", "--dry-run works without one"):
        return 2
    from specssm.bench.timing import copy_bandwidth
    hist = mix.load_histogram_csv(args.histogram) if args.histogram else dict(mix.DEFAULT_ACCEPTANCE)
    dev = torch.device("cuda", torch.cuda.current_device())
    free, _ = torch.cuda.mem_get_info(dev)
    bw = copy_bandwidth(dev, int(min(512 * 2**20, free // 4)))["copy_bw_bytes_per_s"]
    rows = [time_materialize(c["shape"], c["batch"], c["state_dtype"], c["rounding"], args.act_dtype, T=args.T,
                             W=args.W, min_samples=args.min_samples, cold_factor=args.cold_factor, seed=args.seed,
                             hist=hist, copy_bw_bytes_per_s=bw) for c in todo]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "materialize.json").write_text(json.dumps(rows, indent=1))
    sys.stdout.write(table(rows))
    print(f"specssm bench: wrote {out}/materialize.json", file=sys.stderr)
    return 0
