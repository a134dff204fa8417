"""`specssm sim`: run the float64 reference simulator and print what it checked."""
from __future__ import annotations

import argparse

from specssm.reference import checkpointing_ssu_ref
from specssm.sim.simulator import simulate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specssm sim", description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kernel", action="store_true", help="drive the Triton op instead of the reference")
    a = ap.parse_args(argv)
    ssu = checkpointing_ssu_ref
    if a.kernel:
        from specssm.ops import checkpointing_ssu as ssu
    rep = simulate(ssu, steps=a.steps, T=a.T, window=a.window, seed=a.seed)
    print(rep.summary())
    print("pnat histogram:", dict(sorted(rep.pnat_hist.items())))
    return 0
