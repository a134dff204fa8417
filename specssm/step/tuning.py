"""Launch configurations of the step kernels, from per-GPU tables (specssm/step/configs/<card>.json).

A table maps a shape key "P{P}:N{N}:{state dtype}" to a partial config, merged over `DEFAULT` one level
deep (each launch's dict field by field); unknown cards and shapes get `DEFAULT`. A table's
"provenance" entry says which card, versions, date, command and commit produced it.

Fields:
  split_min_batch   from this batch on, launch="auto" runs the split family (coefficient kernel, then
                    the write and no-write mains); below it the fused single launch
  fused             the single-launch kernel (specssm/step/fused.py): BLOCK_P, num_warps, maxnreg,
                    TN_MIN (token tile 8 or 16), tma; its "write" / "no_write" sub-dicts override these
                    for the fused kernel's own split launches (the replay no-write form)
  coef              the coefficient kernel: HB heads per program (a power of two, within one group),
                    num_warps
  write, no_write   the mains: BLOCK_P state rows per tile, num_warps, stages (software pipelining of
                    the persistent loop), ctas_per_sm (programs per SM of the persistent grid), tma
                    (state tiles through a TMA descriptor), maxnreg (register cap; None: the compiler's)
"""
from __future__ import annotations

import copy
import functools
import json
import pathlib

import torch

TABLE_DIR = pathlib.Path(__file__).resolve().parent / "configs"

_MAIN = {"BLOCK_P": 64, "num_warps": 4, "stages": 2, "ctas_per_sm": 4, "tma": True, "maxnreg": None}
DEFAULT = {
    "split_min_batch": 64,
    "fused": {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "TN_MIN": 8, "tma": False,
              "write": {"maxnreg": 168}, "no_write": {}},
    "coef": {"HB": 8, "num_warps": 2},
    "write": dict(_MAIN),
    "no_write": dict(_MAIN),
}


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


def shape_key(P: int, N: int, state_dtype: torch.dtype) -> str:
    return f"P{P}:N{N}:{str(state_dtype).replace('torch.', '')}"


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, dict fields merged one level down (a launch's fields one by one)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# set by the sweeps and tests to try a config without editing tables (same shape as a table entry)
OVERRIDE: dict = {}


def config_for(device, P: int, N: int, state_dtype) -> dict:
    cfg = merge(DEFAULT, _table(card_name(device)).get(shape_key(P, N, state_dtype), {}))
    return merge(cfg, OVERRIDE)
