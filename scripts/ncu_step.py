"""One eager step of ours (split launch) and of the seed, for Nsight Compute to profile kernel by kernel.

usage: ncu --clock-control none --kernel-name regex:'coef_kernel|main_kernel|precompute|persistent' \
           --section SpeedOfLight --section Occupancy --section WarpStateStats \
           python scripts/ncu_step.py --peer .peers --state bf16 --batch 1024

Runs each side twice (the first run compiles); ncu's --launch-skip can drop the first of each. The
inputs are scripts/step_sweep.py's cold-state case (Super TP8, T=6, W=16, mixed pnat).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.step_sweep import Case, load_peer
from specssm.step import tuning


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", default=None)
    ap.add_argument("--state", default="bf16")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--variant", default="{}", help="a tuning override, as scripts/step_sweep.py takes")
    a = ap.parse_args()
    case = Case(a.state, a.batch, "super_tp8")
    with tuning.overridden(json.loads(a.variant)):
        for _ in range(2):
            for step in case.ours("split")[:2]:
                step()
        torch.cuda.synchronize()
    if a.peer:
        fn = load_peer(a.peer)
        for _ in range(2):
            for step in case.seed(fn)[:2]:
                step()
    torch.cuda.synchronize()
    print("done", flush=True)


if __name__ == "__main__":
    main()
