"""The shipped per-GPU tuning tables: provenance, real shape keys, only known config fields, merged over
DEFAULT one launch at a time; each launch's fields reach only that launch."""
import json
import re

import pytest
import torch

from specssm.step import tuning

TABLES = sorted(tuning.TABLE_DIR.glob("*.json"))
KEY = re.compile(r"^P(\d+):N(\d+):(\w+)$")
PROVENANCE = {"card", "triton", "torch", "date", "command", "commit"}


def test_tables_are_shipped():
    assert {p.stem for p in TABLES} >= {"H100", "H200"}


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_table_entries_are_valid(path):
    table = json.loads(path.read_text())
    assert set(table.get("provenance", {})) >= PROVENANCE, "a table says which run it came from"
    for key, cfg in table.items():
        if key == "provenance":
            continue
        m = KEY.match(key)
        assert m, f"{path.name}: bad shape key {key!r}"
        assert isinstance(getattr(torch, m.group(3), None), torch.dtype), f"{path.name}: {key!r} names no dtype"
        assert set(cfg) <= set(tuning.DEFAULT), f"{path.name}: {key!r} has unknown fields {set(cfg) - set(tuning.DEFAULT)}"
        for launch, fields in cfg.items():
            if launch == "split_min_batch":
                assert isinstance(fields, int) and fields > 0
                continue
            allowed = set(tuning.DEFAULT[launch])
            assert set(fields) <= allowed, f"{path.name}: {key!r} {launch} has unknown fields {set(fields) - allowed}"
            if launch == "fused":
                for sub in ("write", "no_write"):
                    assert set(fields.get(sub, {})) <= {"num_warps", "maxnreg", "tma", "TN_MIN"}
                assert fields.get("TN_MIN", 8) in (8, 16), "token tiles of 8 or 16"
            for name in ("BLOCK_P", "num_warps", "stages", "ctas_per_sm", "HB"):
                if name in fields:
                    assert isinstance(fields[name], int) and fields[name] > 0
            assert isinstance(fields.get("tma", False), bool)


def test_config_for_merges_over_default(monkeypatch):
    monkeypatch.setattr(tuning, "card_name", lambda device: "H100")
    cfg = tuning.config_for(torch.device("cpu"), 64, 128, torch.int8)
    table = json.loads((tuning.TABLE_DIR / "H100.json").read_text())["P64:N128:int8"]
    for launch, fields in table.items():
        assert cfg[launch] == ({**tuning.DEFAULT[launch], **fields} if isinstance(fields, dict) else fields)
    assert tuning.config_for(torch.device("cpu"), 80, 128, torch.int8) == tuning.DEFAULT


def test_override_merges_one_launch_at_a_time(monkeypatch):
    monkeypatch.setattr(tuning, "OVERRIDE", {"write": {"stages": 3}, "split_min_batch": 7})
    cfg = tuning.config_for(torch.device("cpu"), 80, 128, torch.float32)
    assert cfg["write"] == {**tuning.DEFAULT["write"], "stages": 3}
    assert cfg["no_write"] == tuning.DEFAULT["no_write"] and cfg["split_min_batch"] == 7


class _Recorder:
    """Stands in for a Triton kernel: records each launch's keyword arguments."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda **kw: self.seen.append((self.name, kw))


@pytest.mark.parametrize("launch", ["dynamic", "split", "always_write"])
def test_launch_configs_reach_their_launches(launch, monkeypatch):
    """Each launch gets its own fields: the fused kernel its top-level config in its dynamic launch, the
    coefficient kernel and the two mains theirs (a no-write register cap leaked into another launch once
    and spilled)."""
    from specssm.ops import always_write_ssu, checkpointing_ssu
    from specssm.step import launch as step_launch
    from tests.ops.helpers import make_step
    seen = []
    for name in ("fused_kernel", "coef_kernel", "main_kernel"):
        monkeypatch.setattr(step_launch, name, _Recorder(name, seen))
    monkeypatch.setattr(tuning, "OVERRIDE", {
        "fused": {"num_warps": 8, "TN_MIN": 16}, "coef": {"num_warps": 1, "HB": 2},
        "write": {"num_warps": 4, "stages": 3, "tma": False}, "no_write": {"num_warps": 1, "stages": 1}})
    if launch == "always_write":
        cache, ins = make_step(batch=3, T=4, act=torch.float32, strategy="always_write", seed=2)
        always_write_ssu(**ins, **cache.op_kwargs(0))
    else:
        cache, ins = make_step(batch=3, T=4, pnat=[14, 3, 13], act=torch.float32, seed=2)
        checkpointing_ssu(**ins, **cache.op_kwargs(0), launch=launch)
    got = [(name, kw["num_warps"], kw.get("STAGES"), kw.get("HB"), kw.get("TMA"), kw.get("TN"), kw.get("WRITE"))
           for name, kw in seen]
    if launch == "dynamic":
        assert got == [("fused_kernel", 8, None, None, False, 16, None)]
    else:
        assert got == [("coef_kernel", 1, None, 2, None, None, None), ("main_kernel", 4, 3, None, False, None, True),
                       ("main_kernel", 1, 1, None, True, None, False)]
