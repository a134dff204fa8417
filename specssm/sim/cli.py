"""`specssm sim`: run the speculative-decoding simulator (slot churn, padding rows, random acceptance)
over a step op and print what it checked against the sequential recurrence."""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from specssm.reference import checkpointing_ssu_ref
from specssm.sim.simulator import simulate

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# relative error bounds of outputs and implied states, by dtype (activations and state)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specssm sim", description=__doc__)
    ap.add_argument("--steps", type=int, default=200, help="verify steps to simulate (default 200)")
    ap.add_argument("--T", type=int, default=4, help="tokens per verify step = draft length + 1 (default 4)")
    ap.add_argument("--window", type=int, default=16, help="history window W of the checkpointing cache, "
                    "0..16 (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the inputs, acceptance, churn and padding")
    ap.add_argument("--kernel", action="store_true", help="drive the Triton op checkpointing_ssu (on the CPU "
                    "through the interpreter: TRITON_INTERPRET=1) instead of the float64 reference")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="activations and state: default "
                    "fp64 for the reference, fp32 for --kernel (the kernel takes fp32, bf16, fp16)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    name = a.dtype or ("fp32" if a.kernel else "fp64")
    dtype = DTYPES[name]
    ssu = checkpointing_ssu_ref
    if a.kernel:
        from specssm._runtime import kernels_interpreted
        if dtype == torch.float64:
            ap.error("--dtype: the Triton op takes fp32, bf16 or fp16 activations, got fp64")
        if not kernels_interpreted():
            print("specssm sim --kernel: the simulator keeps its caches on the CPU, where the Triton op runs "
                  "only through the interpreter: run `TRITON_INTERPRET=1 specssm sim --kernel ...`",
                  file=sys.stderr)
            return 2
        from specssm.ops import checkpointing_ssu
        ssu = functools.partial(checkpointing_ssu, precision="exact")
    rep = simulate(ssu, steps=a.steps, T=a.T, window=a.window, seed=a.seed, dtype=dtype, tol=TOL[dtype])
    print(f"{'checkpointing_ssu (Triton)' if a.kernel else 'checkpointing_ssu_ref'}, {name}: {rep.summary()}")
    print("pnat histogram:", dict(sorted(rep.pnat_hist.items())))
    return 0
