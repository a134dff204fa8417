"""Launch configurations from per-GPU tables (specssm/tuning/<card>.json), not kernel signatures.

A table maps a shape key to a config; unknown cards and shapes fall back to `DEFAULT`. Tables are
written from `scripts/quick_bench.py --sweep` runs on the device (each config timed over graph replays
in one run) and shipped with the package; the `_source` entry of a table says which run.
"""
from __future__ import annotations

import functools
import json
import pathlib

import torch

TABLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "tuning"

# BLOCK_P: state rows per program (a program holds whole rows of N); num_warps;
# write: {num_warps, maxnreg, tma, TN_MIN} for launches where every row writes (split write launch,
#   always-write);
# no_write: {num_warps, maxnreg, tma, TN_MIN} for the split no-write launch (default: the top-level values,
#   which the dynamic launch uses);
# maxnreg: register cap per thread (None: the compiler's choice; a lower cap buys occupancy: 128 gives
#   4 blocks of 4 warps per SM, 168 gives 3);
# split_min_batch: from this batch on, launch="auto" uses the write/no-write split launches;
# TN_MIN: the smallest token tile (the products' N side; T up to it is padded to it). 8 halves the
#   epilogue's (P, TN) tiles at T <= 8 (3-10% faster steps for 16- and 8-bit states); fp32 state's tf32
#   C·Sᵀ of N = 8 compiles to mma.sync instead of wgmma, slower in the H100's split launches.
# tma: read the state tile through a TMA descriptor of the pool (where its strides allow) instead of
#   by pointer: the tile lands in shared memory, and the write program's second read comes from there.
#   Timed per launch: slower in the no-write launch; in the write launch faster for most 16- and 8-bit
#   states at a token tile of 8 (the tables say which, per card).
DEFAULT = {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "write": {"maxnreg": 168}, "no_write": {},
           "split_min_batch": 128, "tma": False, "TN_MIN": 8}


def card_name(device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for tag in ("H200", "H100", "A100", "B200", "L40S"):
        if tag in name:
            return tag
    return name.replace(" ", "_")


@functools.lru_cache(maxsize=None)
def _table(card: str) -> dict:
    path = TABLE_DIR / f"{card}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def shape_key(kernel: str, P: int, N: int, state_dtype: torch.dtype) -> str:
    return f"{kernel}:P{P}:N{N}:{str(state_dtype).replace('torch.', '')}"


# set by the sweeps (scripts/quick_bench.py --sweep) and tests to try a config without editing tables
OVERRIDE: dict = {}


def config_for(device, kernel: str, P: int, N: int, state_dtype) -> dict:
    cfg = dict(DEFAULT)
    cfg.update(_table(card_name(device)).get(shape_key(kernel, P, N, state_dtype), {}))
    cfg.update(OVERRIDE)
    return cfg
