"""Per-GPU tuning tables of the step (schema 2): what they hold, how they are checked and how a launch
finds its configuration in one. Pure functions over JSON data; specssm/step/tuning.py loads the files.

One file per card, specssm/step/configs/<card>.json (<card> as `tuning.card_name` spells it):

    {"schema": 2, "card": "H200",
     "provenance": {"card": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11", "date": "...",
                    "command": "specssm tune ...", "commit": "abc1234"},
     "entries": [
       {"state": "bfloat16", "rounding": "rn", "T": 6, "W": 16, "H": 16, "P": 64, "N": 128, "G": 1,
        "split_min_batch": 32,                       # optional: from this batch on, launch="auto" splits
        "batches": {"1":    {"fused": {"num_warps": 4, "maxnreg": 128}},
                    "1024": {"coef": {...}, "write": {...}, "no_write": {...}}},
        "provenance": {...},                         # optional: the run of this entry, where it differs
        "timing": {"1024": {"tuned_us": 171.0, "default_us": 180.2}}}   # optional, informational
     ]}

An entry is keyed by state dtype, rounding, T, W and shape (H, P, N, G); inside it, a batch bucket (the
batch the tuner timed) maps launches to partial configs, merged field by field over `tuning.DEFAULT`.

Lookup (`lookup`), for one call (state dtype, rounding, T, W, H, P, N, G, batch):

1. entry: only entries of the same state dtype (storage decides the kernels); among them the nearest
   shape (|log2| distances of P and N first, then of H and G), then the same rounding, then the nearest
   T, then the nearest W; ties go to the entry with the smallest (H, P, N, G, rounding, T, W). An
   argument given as None matches every entry on that criterion, except rounding, T and W, which then
   stand for the reference step (benchmarks/README.md, "What is measured": "rn", T=6, W=16).
2. bucket, per launch (fused, coef, write, no_write): of the entry's buckets that configure the launch,
   the nearest batch in log2 (ties to the smaller bucket); batch None takes the largest.
3. nothing found (no table for the card, no entry of the state dtype): `tuning.DEFAULT`.

`tuning.config_for` merges the result over DEFAULT, then the `tuning.overridden` blocks around the
call, then its `override=`.
"""
from __future__ import annotations

import copy
import json
import math

SCHEMA = 2
PROVENANCE_FIELDS = ("card", "triton", "torch", "date", "command", "commit")
KEY_FIELDS = ("state", "rounding", "T", "W", "H", "P", "N", "G")
LAUNCHES = ("fused", "coef", "write", "no_write")
STATES = ("float32", "bfloat16", "float16", "int8", "float8_e4m3fn", "int16")
ROUNDINGS = ("rn", "sr")
# what a missing rounding / T / W stands for in a lookup: the reference step (benchmarks/README.md)
REFERENCE = {"rounding": "rn", "T": 6, "W": 16}
# fields the fused kernel's own split launches (the replay no-write form) may override
FUSED_SUB_FIELDS = ("num_warps", "maxnreg", "tma", "TN_MIN")


class TableError(ValueError):
    """A table that does not follow schema 2; the message names the file part at fault."""


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def _int_in(lo, hi):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


# the values a table may hold per field (what the launcher can launch), not the tuner's search values
FIELD_CHECKS = {
    "BLOCK_P": (lambda v: _pow2(v) and 16 <= v <= 256, "a power of two in [16, 256]"),
    "num_warps": (lambda v: _pow2(v) and v <= 16, "a power of two in [1, 16]"),
    "stages": (_int_in(1, 8), "an int in [1, 8]"),
    "ctas_per_sm": (_int_in(1, 32), "an int in [1, 32]"),
    "tma": (lambda v: isinstance(v, bool), "a bool"),
    "maxnreg": (lambda v: v is None or _int_in(16, 255)(v), "null or an int in [16, 255]"),
    "HB": (lambda v: _pow2(v) and v <= 64, "a power of two in [1, 64]"),
    "TN_MIN": (lambda v: v in (8, 16) and not isinstance(v, bool), "8 or 16"),
    "col_split": (lambda v: v in (1, 2) and not isinstance(v, bool), "1 or 2"),
    "prefetch": (lambda v: isinstance(v, bool), "a bool"),
    "side_stream": (lambda v: isinstance(v, bool), "a bool"),
}


def _check_launch(where: str, launch: str, fields, default: dict) -> None:
    if launch not in LAUNCHES:
        raise TableError(f"{where}: expected launches from {LAUNCHES}, got {launch!r}")
    if not isinstance(fields, dict):
        raise TableError(f"{where}.{launch}: expected an object, got {type(fields).__name__}")
    allowed = set(default[launch])
    for name, value in fields.items():
        if name not in allowed:
            raise TableError(f"{where}.{launch}: unknown field {name!r} (expected from {sorted(allowed)})")
        if launch == "fused" and name in ("write", "no_write"):
            if not isinstance(value, dict) or set(value) - set(FUSED_SUB_FIELDS):
                raise TableError(f"{where}.fused.{name}: expected an object with fields from {FUSED_SUB_FIELDS}, "
                                 f"got {value!r}")
            for sub, v in value.items():
                ok, what = FIELD_CHECKS[sub]
                if not ok(v):
                    raise TableError(f"{where}.fused.{name}.{sub}: expected {what}, got {v!r}")
            continue
        ok, what = FIELD_CHECKS[name]
        if not ok(value):
            raise TableError(f"{where}.{launch}.{name}: expected {what}, got {value!r}")


def entry_key(entry: dict) -> tuple:
    return tuple(entry[f] for f in KEY_FIELDS)


def _check_provenance(where: str, prov) -> None:
    if not isinstance(prov, dict) or set(PROVENANCE_FIELDS) - set(prov):
        got = sorted(prov) if isinstance(prov, dict) else type(prov).__name__
        raise TableError(f"{where}: expected provenance fields {PROVENANCE_FIELDS}, got {got}")


def validate(table: dict, default: dict) -> dict:
    """Raise TableError unless `table` follows schema 2 with launch fields known to `default`
    (tuning.DEFAULT); return it."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA:
        got = table.get("schema") if isinstance(table, dict) else type(table).__name__
        raise TableError(f"schema: expected {SCHEMA}, got {got!r}")
    if not isinstance(table.get("card"), str) or not table["card"]:
        raise TableError(f"card: expected a card name, got {table.get('card')!r}")
    _check_provenance("provenance", table.get("provenance"))
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise TableError(f"entries: expected a list, got {type(entries).__name__}")
    seen = set()
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            raise TableError(f"{where}: expected an object, got {type(e).__name__}")
        missing = [f for f in KEY_FIELDS if f not in e]
        if missing:
            raise TableError(f"{where}: missing key fields {missing}")
        extra = set(e) - set(KEY_FIELDS) - {"split_min_batch", "batches", "provenance", "timing"}
        if extra:
            raise TableError(f"{where}: unknown fields {sorted(extra)}")
        if e["state"] not in STATES:
            raise TableError(f"{where}.state: expected one of {STATES}, got {e['state']!r}")
        if e["rounding"] not in ROUNDINGS:
            raise TableError(f"{where}.rounding: expected one of {ROUNDINGS}, got {e['rounding']!r}")
        for f, lo, hi in (("T", 1, 16), ("W", 0, 16), ("H", 1, 1 << 16), ("P", 1, 1 << 16), ("N", 1, 1 << 16),
                          ("G", 1, 1 << 16)):
            if not _int_in(lo, hi)(e[f]):
                raise TableError(f"{where}.{f}: expected an int in [{lo}, {hi}], got {e[f]!r}")
        if e["H"] % e["G"]:
            raise TableError(f"{where}: expected G dividing H, got H={e['H']}, G={e['G']}")
        if entry_key(e) in seen:
            raise TableError(f"{where}: a second entry for {dict(zip(KEY_FIELDS, entry_key(e)))}")
        seen.add(entry_key(e))
        if "split_min_batch" in e and not _int_in(1, 1 << 30)(e["split_min_batch"]):
            raise TableError(f"{where}.split_min_batch: expected a positive int, got {e['split_min_batch']!r}")
        if "provenance" in e:
            _check_provenance(f"{where}.provenance", e["provenance"])
        batches = e.get("batches", {})
        if not isinstance(batches, dict):
            raise TableError(f"{where}.batches: expected an object, got {type(batches).__name__}")
        for b, launches in batches.items():
            if not (isinstance(b, str) and b.isdigit() and int(b) > 0):
                raise TableError(f"{where}.batches: expected positive batch sizes as keys, got {b!r}")
            if not isinstance(launches, dict):
                raise TableError(f"{where}.batches.{b}: expected an object, got {type(launches).__name__}")
            for launch, fields in launches.items():
                _check_launch(f"{where}.batches.{b}", launch, fields, default)
    return table


def from_v1(old: dict, card: str) -> dict:
    """A schema-1 table ({"provenance", "P{P}:N{N}:{dtype}": partial config}) as schema 2. Schema 1 had
    one config per (P, N, state dtype) for every batch and was tuned at Super TP8, T=6, W=16, RN: each
    key becomes that entry with a single bucket (batch 1), which the nearest-bucket rule applies to
    every batch, as before."""
    entries = []
    for key, cfg in old.items():
        if key == "provenance":
            continue
        p, n, state = key.split(":")
        cfg = dict(cfg)
        entry = {"state": state, "rounding": "rn", "T": 6, "W": 16, "H": 16, "P": int(p[1:]), "N": int(n[1:]),
                 "G": 1}
        if "split_min_batch" in cfg:
            entry["split_min_batch"] = cfg.pop("split_min_batch")
        entry["batches"] = {"1": cfg}
        entries.append(entry)
    return {"schema": SCHEMA, "card": card, "provenance": dict(old["provenance"]), "entries": entries}


def _log2_dist(a, b) -> float:
    return abs(math.log2(a / b))


def entry_rank(entry: dict, rounding, T, W, H, P, N, G) -> tuple:
    """Sort key of an entry for a call (smaller is nearer): the fallback order of the module doc."""
    rounding = REFERENCE["rounding"] if rounding is None else rounding
    T = REFERENCE["T"] if T is None else T
    W = REFERENCE["W"] if W is None else W
    d_pn = _log2_dist(P, entry["P"]) + _log2_dist(N, entry["N"])
    d_hg = (0.0 if H is None else _log2_dist(H, entry["H"])) + (0.0 if G is None else _log2_dist(G, entry["G"]))
    return (d_pn, d_hg, entry["rounding"] != rounding, abs(T - entry["T"]), abs(W - entry["W"]),
            (entry["H"], entry["P"], entry["N"], entry["G"], entry["rounding"], entry["T"], entry["W"]))


def select_entry(entries, state: str, rounding=None, T=None, W=None, H=None, P=None, N=None, G=None):
    """The entry a call of this state dtype and shape uses, or None (no entry of the state dtype)."""
    same = [e for e in entries if e["state"] == state]
    if not same:
        return None
    return min(same, key=lambda e: entry_rank(e, rounding, T, W, H, P, N, G))


def select_bucket(batches: dict, launch: str, batch) -> str | None:
    """The bucket (batch key) whose config of `launch` a call of `batch` rows uses, or None."""
    have = [int(b) for b, launches in batches.items() if launch in launches]
    if not have:
        return None
    if batch is None:
        return str(max(have))
    return str(min(have, key=lambda b: (_log2_dist(max(batch, 1), b), b)))


def lookup(table: dict, state: str, rounding=None, T=None, W=None, H=None, P=None, N=None, G=None,
           batch=None) -> tuple[dict, dict]:
    """(partial config, where it came from) for one call; ({}, {}) when the table has nothing for it.
    Where: {"entry": key fields of the entry, "buckets": {launch: batch key}}."""
    entry = select_entry(table.get("entries", []), state, rounding, T, W, H, P, N, G)
    if entry is None:
        return {}, {}
    partial, buckets = {}, {}
    if "split_min_batch" in entry:
        partial["split_min_batch"] = entry["split_min_batch"]
    for launch in LAUNCHES:
        b = select_bucket(entry.get("batches", {}), launch, batch)
        if b is not None:
            partial[launch] = entry["batches"][b][launch]
            buckets[launch] = b
    return partial, {"entry": {f: entry[f] for f in KEY_FIELDS}, "buckets": buckets}


def merge_entries(base: dict, new_entries, provenance: dict) -> dict:
    """`base` (a schema-2 table) with `new_entries` merged in (base is not changed). A new entry of a
    key base lacks is added; one of a key base has is merged into it bucket by bucket: each launch it
    configures replaces that launch's fields in the bucket of the same batch, field by field, so knobs
    it did not tune stay (the replay form's "write" / "no_write" overrides of the fused launch, say);
    its split_min_batch and timing replace the old ones, and the entry takes its provenance (an
    entry's provenance names the newest run that changed it). New entries without a provenance get
    `provenance`, which also becomes the table's."""
    merged = {entry_key(e): {**copy.deepcopy(e), "provenance": e.get("provenance", base["provenance"])}
              for e in base.get("entries", [])}
    for e in new_entries:
        key, prov = entry_key(e), e.get("provenance", provenance)
        if key not in merged:
            merged[key] = {**copy.deepcopy(e), "provenance": prov}
            continue
        m = merged[key]
        for b, launches in e.get("batches", {}).items():
            bucket = m.setdefault("batches", {}).setdefault(b, {})
            for launch, fields in launches.items():
                bucket[launch] = {**bucket.get(launch, {}), **copy.deepcopy(fields)}
        if "split_min_batch" in e:
            m["split_min_batch"] = e["split_min_batch"]
        if "timing" in e:
            m.setdefault("timing", {}).update(copy.deepcopy(e["timing"]))
        m["provenance"] = prov
    entries = sorted(merged.values(), key=entry_key)
    return {"schema": SCHEMA, "card": base["card"], "provenance": provenance, "entries": entries}


def dumps(table: dict) -> str:
    """A table as JSON text a reviewer can diff: one line per entry key, per optional field and per
    batch bucket."""
    def one(v):
        return json.dumps(v)

    lines = ["{", f' "schema": {one(table["schema"])},', f' "card": {one(table["card"])},',
             f' "provenance": {one(table["provenance"])},', ' "entries": [']
    entries = table.get("entries", [])
    for i, e in enumerate(entries):
        key = ", ".join(f"{one(f)}: {one(e[f])}" for f in KEY_FIELDS)
        parts = [f"  {{{key}"]
        for f in ("split_min_batch", "provenance", "timing"):
            if f in e:
                parts.append(f"   {one(f)}: {one(e[f])}")
        buckets = sorted(e.get("batches", {}).items(), key=lambda kv: int(kv[0]))
        if buckets:
            body = ",\n".join(f"    {one(b)}: {one(cfg)}" for b, cfg in buckets)
            parts.append(f'   "batches": {{\n{body}}}')
        lines.append(",\n".join(parts) + "}" + ("," if i + 1 < len(entries) else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"
