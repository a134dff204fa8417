"""Launch configurations of the step kernels, from per-GPU tables (specssm/step/configs/<card>.json).

The tables follow schema 2 (specssm/step/tables.py: layout, checks, lookup and its fallbacks): entries
keyed by state dtype, rounding, T, W and shape (H, P, N, G), each with configs per batch bucket and
provenance. `specssm tune` writes them (specssm/tune/). A folder named by SPECSSM_TUNING_DIR is searched
for <card>.json before the shipped one (to try a freshly tuned table without installing it).

Fields of a config (`DEFAULT` lists them all):
  split_min_batch   from this batch on, launch="auto" runs the split family (coefficient kernel, then
                    the write and no-write mains); below it the fused single launch
  fused             the single-launch kernel (specssm/step/fused.py): BLOCK_P, num_warps, maxnreg,
                    TN_MIN (token tile 8 or 16), tma; its "write" / "no_write" sub-dicts override these
                    for the fused kernel's own split launches (the replay no-write form)
  coef              the coefficient kernel: HB heads per program (a power of two, within one group),
                    num_warps, maxnreg (register cap: more programs per SM, each waiting on its loads)
  write, no_write   the mains: BLOCK_P state rows per tile, num_warps, stages (software pipelining of
                    the persistent loop), ctas_per_sm (programs per SM of the persistent grid), tma
                    (state tiles through a TMA descriptor), maxnreg (register cap; None: the compiler's),
                    col_split (write main, fp32 / bf16 / fp16 states: 2 folds a tile's columns in two
                    halves, one after the other, for fewer live registers), prefetch (a GPU: the program's
                    first tiles' state requested into L2 before it waits for the coefficient kernel);
                    write also side_stream (CUDA: the write main on a second stream, beside the no-write
                    main, both after the coefficient kernel, without the PDL chain)
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pathlib

import torch

from specssm.step import tables

TABLE_DIR = pathlib.Path(__file__).resolve().parent / "configs"
TABLE_DIR_ENV = "SPECSSM_TUNING_DIR"

_MAIN = {"BLOCK_P": 64, "num_warps": 4, "stages": 2, "ctas_per_sm": 4, "tma": True, "maxnreg": None, "col_split": 1,
         "prefetch": False}
DEFAULT = {
    "split_min_batch": 64,
    "fused": {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "TN_MIN": 8, "tma": False,
              "write": {"maxnreg": 168}, "no_write": {}},
    "coef": {"HB": 8, "num_warps": 2, "maxnreg": None},
    "write": dict(_MAIN, side_stream=False),
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


def dtype_name(state_dtype) -> str:
    """A state dtype as tables spell it ("float32", "int8", "float8_e4m3fn", ...)."""
    return str(state_dtype).replace("torch.", "")


def table_path(card: str) -> pathlib.Path:
    """The table file of a card: $SPECSSM_TUNING_DIR/<card>.json if there is one, else the shipped one."""
    extra = os.environ.get(TABLE_DIR_ENV)
    if extra and (pathlib.Path(extra) / f"{card}.json").exists():
        return pathlib.Path(extra) / f"{card}.json"
    return TABLE_DIR / f"{card}.json"


def read_table(path, card: str | None = None) -> dict:
    """A table file checked against schema 2 (a schema-1 file is converted first); TableError names
    the file and the part at fault."""
    path = pathlib.Path(path)
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "schema" not in data:
        data = tables.from_v1(data, card or path.stem)
    try:
        return tables.validate(data, DEFAULT)
    except tables.TableError as e:
        raise tables.TableError(f"{path}: {e}") from None


@functools.cache
def _table(card: str) -> dict:
    path = table_path(card)
    return read_table(path, card) if path.exists() else {}


@functools.lru_cache(maxsize=4096)
def _config(card, state, rounding, T, W, H, P, N, G, batch, override_json) -> str:
    # the merged config per call shape and override, as JSON (no caller can mutate it): a step asks on
    # every call, and merging deep-copies DEFAULT twice
    partial, _ = tables.lookup(_table(card), state, rounding, T, W, H, P, N, G, batch)
    return json.dumps(merge(merge(DEFAULT, partial), json.loads(override_json)))


def reload() -> None:
    """Forget loaded tables and lookups (after a table file or SPECSSM_TUNING_DIR changed)."""
    _table.cache_clear()
    _config.cache_clear()


def shape_key(P: int, N: int, state_dtype: torch.dtype) -> str:
    """Schema 1's key of a (P, N, state dtype); kept for scripts that print it."""
    return f"P{P}:N{N}:{dtype_name(state_dtype)}"


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, dict fields merged one level down (a launch's fields one by one)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# a config tried without editing tables (same shape as a config): set only inside `overridden`
_override: dict = {}


@contextlib.contextmanager
def overridden(over: dict):
    """Every step launched inside the block takes `over` merged on top of its config (and of an
    enclosing block's): how the sweeps, the tuner and tests try a config."""
    global _override
    saved = _override
    _override = merge(saved, over)
    try:
        yield
    finally:
        _override = saved


def active_override() -> dict:
    """A copy of what `overridden` blocks merge on top of the configs now ({} outside them)."""
    return copy.deepcopy(_override)


def config_for(device, P: int, N: int, state_dtype, batch=None, T=None, W=None, rounding=None, H=None,
               G=None, override=None) -> dict:
    """The launch config of a step: DEFAULT, then the card's table (lookup and fallbacks:
    specssm/step/tables.py), then the `overridden` blocks around the call, then `override` (this call
    only)."""
    cfg = json.loads(_config(card_name(device), dtype_name(state_dtype), rounding, T, W, H, P, N, G, batch,
                             json.dumps(_override, sort_keys=True)))
    return merge(cfg, override) if override else cfg


def explain(device, P: int, N: int, state_dtype, batch=None, T=None, W=None, rounding=None, H=None,
            G=None) -> dict:
    """Where config_for's table part comes from: {"card", "path", "entry", "buckets"} ({"card", "path"}
    only when the defaults apply)."""
    card = card_name(device)
    _, where = tables.lookup(_table(card), dtype_name(state_dtype), rounding, T, W, H, P, N, G, batch)
    return {"card": card, "path": str(table_path(card)), **where}
