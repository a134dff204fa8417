"""Does Programmatic Dependent Launch help the conv1d update -> SSM step chain? (GPU, sm_90+)

For each batch: a CUDA graph of [conv1d_update -> checkpointing_ssu] over rotating slot sets (state cold,
as in `specssm bench`), timed with CUDA events (as `specssm bench --timer events`) once with pdl=False and
once with pdl=True on both ops; after the same replays the outputs and caches of the two runs must be
bit-identical (specssm/bench/pdl.py). The step reads x, B, C as views of the conv output, as the model
does. Super TP8 shapes, T=6, W=16, bf16 activations, fp32 state.
usage: python scripts/pdl_check.py --out DIR [--batches 1,8,64,256,1024]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specssm.bench.pdl import Chain, H, N, P, measure
from specssm.bench.timing import copy_bandwidth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/pdl_check", help="folder for pdl_check.json")
    ap.add_argument("--batches", default="1,8,64,256,1024")
    ap.add_argument("--T", type=int, default=6)
    ap.add_argument("--W", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating off/on rounds (best kept)")
    ap.add_argument("--max-sets", type=int, default=256, help="most slot sets (steps) in one graph")
    a = ap.parse_args(argv)
    card, cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    bw = copy_bandwidth(torch.device("cuda"), 1 << 28)["copy_bw_bytes_per_s"]
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {card} (sm_{cap[0]}{cap[1]})  copy {bw / 1e12:.2f} TB/s  super_tp8 T={a.T} W={a.W} bf16/fp32 state"
          + ("" if cap >= (9, 0) else "  -- PDL needs sm_90+: pdl=True is ignored here"))
    rows = []
    for batch in (int(b) for b in a.batches.split(",")):
        # enough sets that > 4x L2 of states passes between two visits of a slot
        sets = max(1, min(a.max_sets, math.ceil(4 * l2 / (batch * H * P * N * 4))))
        chain = Chain(batch, sets, a.T, a.W)
        off, on, differ = measure(chain, sets, a.reps, a.rounds)
        rows.append(dict(batch=batch, sets=sets, us_no_pdl=off, us_pdl=on, ratio=on / off,
                         identical=not differ, differ=differ))
        print(f"batch {batch:5d}  sets {sets:3d}  no pdl {off:8.2f} us  pdl {on:8.2f} us  ratio {on / off:.3f}  "
              + ("identical" if not differ else "DIFFERENT: " + ",".join(differ)), flush=True)
        del chain
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pdl_check.json"), "w") as f:
        json.dump(dict(card=card, capability=list(cap), copy_bw=bw, T=a.T, W=a.W, rows=rows), f, indent=1)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
