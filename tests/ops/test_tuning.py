"""The shipped per-GPU tuning tables: every entry names a real shape key and only known config fields,
and config_for merges it over DEFAULT."""
import json
import re

import pytest
import torch

from specssm.ops import tuning

TABLES = sorted(tuning.TABLE_DIR.glob("*.json"))
KEY = re.compile(r"^ssu:P(\d+):N(\d+):(\w+)$")


def test_tables_are_shipped():
    assert {p.stem for p in TABLES} >= {"H100", "H200"}


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_table_entries_are_valid(path):
    table = json.loads(path.read_text())
    assert isinstance(table.get("_source"), str) and table["_source"], "a table says which run it came from"
    for key, cfg in table.items():
        if key == "_source":
            continue
        m = KEY.match(key)
        assert m, f"{path.name}: bad shape key {key!r}"
        assert isinstance(getattr(torch, m.group(3), None), torch.dtype), f"{path.name}: {key!r} names no dtype"
        assert set(cfg) <= set(tuning.DEFAULT), f"{path.name}: {key!r} has unknown fields {set(cfg) - set(tuning.DEFAULT)}"
        for sub in ("write", "no_write"):
            assert set(cfg.get(sub, {})) <= {"num_warps", "maxnreg", "tma", "TN_MIN"}
        for c in (cfg, cfg.get("write", {}), cfg.get("no_write", {})):
            for name in ("BLOCK_P", "num_warps", "maxnreg", "split_min_batch"):
                if name in c:
                    assert isinstance(c[name], int) and c[name] > 0
            assert c.get("TN_MIN", 8) in (8, 16), "token tiles of 8 or 16"
            assert isinstance(c.get("tma", False), bool)


def test_config_for_merges_over_default(monkeypatch):
    monkeypatch.setattr(tuning, "card_name", lambda device: "H100")
    cfg = tuning.config_for(torch.device("cpu"), "ssu", 64, 128, torch.int8)
    table = json.loads((tuning.TABLE_DIR / "H100.json").read_text())["ssu:P64:N128:int8"]
    assert cfg == {**tuning.DEFAULT, **table}
    assert tuning.config_for(torch.device("cpu"), "ssu", 80, 128, torch.int8) == tuning.DEFAULT



@pytest.mark.parametrize("launch", ["dynamic", "split", "always_write"])
def test_branch_configs_reach_their_launches(launch, monkeypatch):
    """The table's write / no_write fields (warps, TMA, token tile) reach only their own launches: the
    dynamic launch (both branches' code) keeps the top-level config (a no-write register cap leaked
    into it once and spilled)."""
    from specssm.ops import always_write_ssu, checkpointing
    from tests.ops.helpers import make_step
    seen = []

    class Recorder:     # stands in for the Triton kernel: records each launch's branch, warps and TMA reads
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((int(kw["BRANCH"]), kw["num_warps"], kw["TMA"], kw["TN"]))

    monkeypatch.setattr(checkpointing, "_ssu_kernel", Recorder())
    monkeypatch.setattr(tuning, "OVERRIDE", {"num_warps": 4, "TN_MIN": 8, "no_write": {"num_warps": 2},
                                                "write": {"num_warps": 8, "tma": True, "TN_MIN": 16}})
    if launch == "always_write":
        cache, ins = make_step(batch=3, T=4, act=torch.float32, strategy="always_write", seed=2)
        always_write_ssu(**ins, **cache.op_kwargs(0))
    else:
        cache, ins = make_step(batch=3, T=4, pnat=[14, 3, 13], act=torch.float32, seed=2)
        checkpointing.checkpointing_ssu(**ins, **cache.op_kwargs(0), launch=launch)
    branches = {"dynamic": [(0, 4, False, 8)], "split": [(1, 8, True, 16), (2, 2, False, 8)],
                "always_write": [(1, 8, True, 16)]}[launch]
    assert seen == branches
