"""Time step-kernel variants side by side with the seed (TensorRT-LLM's Triton kernel) in one process.

usage: python scripts/step_sweep.py --peer .peers --states fp32,bf16,int8 --batches 1,8,64,256,1024 \
           --variants '[{}, {"no_write": {"stages": 3}}]' [--check] [--out DIR]

Each variant is a tuning override (specssm/step/tuning.py) of our split family ("launch": "dynamic"
in a variant runs the fused single launch instead). Method (benchmarks/README.md): Super TP8, T=6, W=16, bf16
activations, stationary mixed pnat, a CUDA graph of steps on rotating slot sets (state cold), CUPTI
spans between marker kernels; plans and the seed's work items are built outside the spans, and only
the seed's kernels named *precompute* / *persistent* count (its wrapper's ring gathers do not).
--check compares the first variant with the float64 reference at batch 48 first.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specssm.bench.timing import StepMarkers, capture_graph, profile_device_events, split_steps
from specssm.ops import checkpointing_ssu
from specssm.step import tuning
from specssm.tune.gpu import Env
from specssm.tune.space import Target

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
          "fp8": torch.float8_e4m3fn}
SHAPES = {"super_tp8": (16, 64, 128, 1), "tp1": (128, 64, 128, 8)}
SEED_KERNELS = ("precompute", "persistent")


def load_peer(path):
    path = os.path.join(path, "trtllm_replay") if os.path.isdir(os.path.join(path, "trtllm_replay")) else path
    spec = importlib.util.spec_from_file_location("trtllm_replay", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trtllm_replay"] = mod
    spec.loader.exec_module(mod)
    from trtllm_replay.replay_selective_state_update import replay_selective_state_update
    return replay_selective_state_update


INPUTS = ("x", "dt", "A", "B", "C", "out", "D", "z", "dt_bias", "dt_softplus")


class Case:
    """One (state dtype, batch): the tuner's cold-state environment (specssm/tune/gpu.py), plus the
    seed's work items from each slot set's plan."""

    def __init__(self, state, batch, shape, T=6, W=16, rounding="rn", seed=0):
        H, P, N, G = SHAPES[shape]
        t = Target(state=str(DTYPES[state]).replace("torch.", ""), rounding=rounding, T=T, W=W, H=H, P=P, N=N, G=G,
                   batch=batch)
        env = Env(t, torch.device("cuda"), seed=seed)
        self.sets, self.cache, self.sbis, self.plans, self.kw = env.sets, env.cache, env.sbis, env.plans, env.kw
        c = self.cache
        self.items = []
        for p in self.plans:
            slots = p.slots[:batch].long()
            self.items.append(torch.stack([p.order[:batch], p.slots[:batch], c.pnat[slots],
                                           torch.zeros_like(p.order[:batch])], 1).to(torch.int32).contiguous())
        self.rounding = rounding
        self.writes = sum(int(p.counts[0]) for p in self.plans) / self.sets

    def ours(self, launch="auto"):
        return [lambda s=s, p=p: checkpointing_ssu(**self.kw, state_batch_indices=s, plan=p, launch=launch,
                                                    validate=False)
                for s, p in zip(self.sbis, self.plans)]

    def seed(self, fn):
        lc, c = self.cache.layers[0], self.cache
        kw = {k: v for k, v in self.kw.items() if k in INPUTS}
        extra = dict(rand_seed=c.seeds, philox_rounds=10) if self.rounding == "sr" else {}
        if lc.state_scale is not None:
            extra["state_scales"] = lc.state_scale
        return [lambda s=s, p=p, it=it: fn(lc.state, lc.x_cache, lc.B_cache, lc.dt_cache, c.ring_start, c.pnat,
                                           n_writes=p.counts[0:1], replay_work_items=it, state_batch_indices=s,
                                           **kw, **extra)
                for s, p, it in zip(self.sbis, self.plans, self.items)]


def time_steps(steps, kernel_filter=None, replays=20):
    markers = StepMarkers(torch.device("cuda"))

    def body():
        for st in steps:
            markers.begin()
            st()
            markers.end()
    graph = capture_graph(body)
    graph.replay()
    torch.cuda.synchronize()
    ev = profile_device_events(lambda: [graph.replay() for _ in range(replays)])
    spans, per_kernel = [], {}
    for step in split_steps(ev):
        if kernel_filter:
            step = [e for e in step if any(k in e.name for k in kernel_filter)]
        if step:
            spans.append(max(e.end for e in step) - min(e.start for e in step))
            names = {}
            for e in step:
                key = e.name.split("_kernel")[0][-12:]
                names[key] = names.get(key, 0.0) + e.end - e.start
            for k, v in names.items():
                per_kernel.setdefault(k, []).append(v)
    spans.sort()
    kern = {k: sorted(v)[len(v) // 2] for k, v in per_kernel.items()}
    return spans[len(spans) // 2], kern


def check(state, variant):
    """Outputs and caches of the variant against the float64 reference at batch 48 (with padding)."""
    from specssm.reference import checkpointing_ssu_ref
    from tests.helpers.compare import run_and_compare
    from tests.helpers.steps import make_step
    cache, ins = make_step(batch=48, slots=52, T=6, pad_rows=(3,), act=torch.bfloat16, state_dtype=DTYPES[state],
                           seed=7, H=16, P=64, N=128, G=1)
    launch = variant.get("launch", "split")
    run_and_compare(checkpointing_ssu, checkpointing_ssu_ref, cache, ins, device="cuda", precision="fast",
                    launch=launch)


def _config_part(variant: dict) -> dict:
    """A variant without its "launch" key: the config override it times."""
    return {k: x for k, x in variant.items() if k != "launch"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=None)
    ap.add_argument("--states", default="fp32,bf16,fp16,int8,fp8")
    ap.add_argument("--batches", default="1,8,64,256,1024")
    ap.add_argument("--shape", default="super_tp8")
    ap.add_argument("--rounding", default="rn")
    ap.add_argument("--variants", default="[{}]")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    variants = json.loads(a.variants)
    peer = load_peer(a.peer) if a.peer else None
    print(f"# {torch.cuda.get_device_name(0)} {a.shape} T=6 W=16 {a.rounding}", flush=True)
    rows = []
    for state in a.states.split(","):
        if a.check:
            for v in variants[:1]:
                try:
                    with tuning.overridden(_config_part(v)):
                        check(state, v)
                    print(f"check {state} {json.dumps(v)}: ok", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"check {state} {json.dumps(v)}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        for batch in [int(b) for b in a.batches.split(",")]:
            case = Case(state, batch, a.shape, rounding=a.rounding)
            line = {"state": state, "batch": batch, "writes": case.writes}
            if peer is not None:
                try:
                    line["seed"], kern = time_steps(case.seed(peer), SEED_KERNELS)
                    print(f"   seed {state} b{batch}: {line['seed']:.2f} us  " + " ".join(
                        f"{k} {t:.1f}" for k, t in kern.items()), flush=True)
                except Exception as e:  # noqa: BLE001
                    line["seed"] = float("nan")
                    print(f"seed {state} b{batch}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            for i, v in enumerate(variants):
                try:
                    with tuning.overridden(_config_part(v)):
                        line[f"v{i}"], kern = time_steps(case.ours(v.get("launch", "split")))
                    line[f"k{i}"] = kern
                    print(f"   v{i} {state} b{batch}: {line[f'v{i}']:.2f} us  " + " ".join(
                        f"{k} {t:.1f}" for k, t in kern.items()), flush=True)
                except Exception as e:  # noqa: BLE001
                    line[f"v{i}"] = float("nan")
                    print(f"v{i} {state} b{batch}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(line)
            cells = " ".join(f"{k} {line[k]:8.2f}" for k in line if k == "seed" or (k[0] == "v" and k[1:].isdigit()))
            print(f"{state:5s} b{batch:5d} w{case.writes:6.1f} {cells}", flush=True)
            del case
            torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "sweep.json"), "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(0), variants=variants, rows=rows), f, indent=1)
    print("\nvariants:", *(f"v{i}={json.dumps(v)}" for i, v in enumerate(variants)), sep="\n  ")
    print(f"{'state':5s} {'batch':>5s} " + ("seed     " if peer else "")
          + " ".join(f"v{i}{'':6s}" for i in range(len(variants))) + (" best/seed" if peer else ""))
    for r in rows:
        vs = [r[f"v{i}"] for i in range(len(variants))]
        best = min(vs)
        print(f"{r['state']:5s} {r['batch']:5d} " + (f"{r['seed']:8.2f} " if peer else "")
              + " ".join(f"{v:8.2f}" for v in vs) + (f"  {best / r['seed']:.2f}" if peer else ""))


if __name__ == "__main__":
    main()
