"""The per-GPU tuning tables (schema 2, specssm/step/tables.py): the shipped tables validate, schema 1
converts without changing a config, bad tables are refused naming the part at fault, the lookup's
fallbacks (nearest shape, rounding, T, W, batch bucket, then DEFAULT) pick what the docs say, overrides
stack, and the launcher's call reaches the table with the step's batch, T, W, rounding and shape."""
import copy
import json

import pytest
import torch

from specssm.step import tables, tuning

TABLES = sorted(tuning.TABLE_DIR.glob("*.json"))
PROV = {"card": "NVIDIA TEST", "triton": "3.6.0", "torch": "2.13", "date": "2026-12-03", "command": "test",
        "commit": "0000000"}

# schema 1 as shipped for the H200 up to 2026-12-02 (two of its keys)
H200_V1 = {
    "provenance": {"card": "NVIDIA H200", "triton": "3.6.0", "torch": "2.11", "date": "2026-11-27",
                   "command": "scripts/quick_bench.py --sweep (fused kernel: register caps, token tile, TMA)",
                   "commit": "b6f0249"},
    "P64:N128:float32": {"fused": {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 168, "write": {"maxnreg": 168},
                                   "no_write": {"maxnreg": 128}}},
    "P64:N128:bfloat16": {"fused": {"no_write": {"maxnreg": 96}, "write": {"maxnreg": 128, "tma": True}}},
}


def _entry(state="bfloat16", rounding="rn", T=6, W=16, H=16, P=64, N=128, G=1, **rest):
    return {"state": state, "rounding": rounding, "T": T, "W": W, "H": H, "P": P, "N": N, "G": G, **rest}


# A: the exact Super TP8 entry, three buckets; B: SR; C: T=4; D: TP1; E: P=80
LOOKUP_TABLE = {"schema": 2, "card": "TEST", "provenance": PROV, "entries": [
    _entry(split_min_batch=64, batches={"1": {"fused": {"num_warps": 2}},
                                        "64": {"coef": {"HB": 4}, "write": {"stages": 3}},
                                        "1024": {"write": {"stages": 1}, "no_write": {"ctas_per_sm": 8}}}),
    _entry(rounding="sr", batches={"1024": {"write": {"maxnreg": 128}}}),
    _entry(T=4, batches={"1024": {"write": {"ctas_per_sm": 2}}}),
    _entry(H=128, G=8, batches={"1024": {"write": {"BLOCK_P": 32}}}),
    _entry(P=80, batches={"1024": {"write": {"BLOCK_P": 16}}}),
]}


@pytest.fixture
def test_card(tmp_path, monkeypatch):
    """config_for on the CPU reads LOOKUP_TABLE as card "TEST" through SPECSSM_TUNING_DIR."""
    (tmp_path / "TEST.json").write_text(tables.dumps(LOOKUP_TABLE))
    monkeypatch.setenv(tuning.TABLE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(tuning, "card_name", lambda device: "TEST")
    tuning.reload()
    yield tmp_path
    tuning.reload()


def test_tables_are_shipped():
    assert {p.stem for p in TABLES} >= {"H100", "H200"}


@pytest.mark.parametrize("path", TABLES, ids=[p.stem for p in TABLES])
def test_shipped_tables_validate_against_the_schema(path):
    raw = json.loads(path.read_text())
    assert raw["schema"] == tables.SCHEMA and raw["card"] == path.stem, "shipped tables are schema 2, named by card"
    tables.validate(raw, tuning.DEFAULT)
    assert tables.dumps(raw) == path.read_text(), "shipped tables are written by tables.dumps (stable diffs)"


def test_schema1_converts_without_changing_a_config():
    new = tables.validate(tables.from_v1(H200_V1, "H200"), tuning.DEFAULT)
    assert new["provenance"] == H200_V1["provenance"]
    for state in ("float32", "bfloat16"):
        for batch in (1, 8, 1024):     # one bucket: every batch gets it
            partial, _ = tables.lookup(new, state, "rn", 6, 16, 16, 64, 128, 1, batch)
            assert partial == H200_V1[f"P64:N128:{state}"]
    shipped = json.loads((tuning.TABLE_DIR / "H200.json").read_text())
    for got, want in zip(shipped["entries"][:2], new["entries"]):
        # the batch-1 (fused) buckets are the schema-1 table converted; later buckets were added by sweeps
        assert got["batches"]["1"] == want["batches"]["1"], "the shipped H200 table's batch-1 buckets changed"


@pytest.mark.parametrize("mutate,what", [
    (lambda t: t.update(schema=1), "schema: expected 2"),
    (lambda t: t["provenance"].pop("commit"), "provenance: expected provenance fields"),
    (lambda t: t["entries"][0]["batches"]["1"].update(bogus={}), "entries[0].batches.1: expected launches"),
    (lambda t: t["entries"][0]["batches"]["64"]["write"].update(warps=4),
     "entries[0].batches.64.write: unknown field 'warps'"),
    (lambda t: t["entries"][0]["batches"]["64"]["write"].update(num_warps=3),
     "entries[0].batches.64.write.num_warps: expected a power of two"),
    (lambda t: t["entries"][0]["batches"]["64"]["coef"].update(HB=6),
     "entries[0].batches.64.coef.HB: expected a power of two"),
    (lambda t: t["entries"][0]["batches"]["1"]["fused"].update(write={"BLOCK_P": 16}),
     "entries[0].batches.1.fused.write: expected an object with fields"),
    (lambda t: t["entries"][0]["batches"].update({"0": {}}), "entries[0].batches: expected positive batch sizes"),
    (lambda t: t["entries"][1].update(rounding="rn"), "entries[1]: a second entry"),
    (lambda t: t["entries"][3].update(G=3), "entries[3]: expected G dividing H"),
    (lambda t: t["entries"][0].update(split_min_batch=0), "entries[0].split_min_batch: expected a positive int"),
    (lambda t: t["entries"][0].update(state="float64"), "entries[0].state: expected one of"),
    (lambda t: t["entries"][2].update(T=17), "entries[2].T: expected an int in [1, 16]"),
])
def test_validate_names_the_part_at_fault(mutate, what):
    bad = copy.deepcopy(LOOKUP_TABLE)
    mutate(bad)
    with pytest.raises(tables.TableError) as e:
        tables.validate(bad, tuning.DEFAULT)
    assert what in str(e.value), str(e.value)


def _where(**call):
    args = dict(rounding="rn", T=6, W=16, H=16, P=64, N=128, G=1, batch=1024)
    args.update(call)
    partial, where = tables.lookup(LOOKUP_TABLE, call.pop("state", "bfloat16") if "state" in call else "bfloat16",
                                   *(args[k] for k in ("rounding", "T", "W", "H", "P", "N", "G", "batch")))
    return partial, where


@pytest.mark.parametrize("call,entry,buckets", [
    # exact entry; each launch from its nearest bucket that configures it
    ({}, {}, {"fused": "1", "coef": "64", "write": "1024", "no_write": "1024"}),
    ({"batch": 200}, {}, {"write": "64"}),              # log2: 1.64 from 64, 2.36 from 1024
    ({"batch": 256}, {}, {"write": "64"}),              # 2 from both: the smaller bucket
    ({"batch": 300}, {}, {"write": "1024"}),            # 2.23 from 64, 1.77 from 1024
    ({"batch": None}, {}, {"write": "1024", "coef": "64"}),   # no batch: the largest bucket
    ({"rounding": "sr"}, {"rounding": "sr"}, {"write": "1024"}),      # the rounding before T
    ({"rounding": "sr", "T": 4}, {"rounding": "sr"}, {}),
    ({"T": 4}, {"T": 4}, {}),
    ({"T": 5}, {"T": 4}, {}),                           # 1 from T=4 and T=6: the smaller key
    ({"T": 8}, {}, {}),
    ({"W": 8}, {}, {}),
    ({"H": 128, "G": 8}, {"H": 128, "G": 8}, {}),
    ({"H": 64, "G": 4}, {"H": 128, "G": 8}, {}),        # log2 distance 2 from TP1, 4 from TP8
    ({"H": 32, "G": 2}, {}, {}),                        # 2 from TP8, 4 from TP1
    ({"P": 80}, {"P": 80}, {}),
    ({"P": 96}, {"P": 80}, {}),                         # 0.26 from P=80, 0.58 from P=64
    ({"P": 48}, {}, {}),                                # 0.42 from P=64, 0.74 from P=80
    ({"P": 80, "H": 128, "G": 8}, {"P": 80}, {}),       # P and N before H and G
    ({"H": None, "G": None}, {}, {}),                   # unknown H, G: ties to the smallest H
    ({"rounding": None, "T": None, "W": None}, {}, {}),  # unknown: the reference step (rn, 6, 16)
])
def test_lookup_fallbacks(call, entry, buckets):
    partial, where = _where(**call)
    want = {"state": "bfloat16", "rounding": "rn", "T": 6, "W": 16, "H": 16, "P": 64, "N": 128, "G": 1, **entry}
    assert where["entry"] == want
    for launch, b in buckets.items():
        assert where["buckets"][launch] == b
        chosen = next(e for e in LOOKUP_TABLE["entries"] if tables.entry_key(e) == tables.entry_key(want))
        assert partial[launch] == chosen["batches"][b][launch]


def test_lookup_without_an_entry_of_the_state_dtype_is_empty():
    assert tables.lookup(LOOKUP_TABLE, "float16", "rn", 6, 16, 16, 64, 128, 1, 8) == ({}, {})


def test_config_for_merges_table_override_and_call_override(test_card, tuned):
    cpu = torch.device("cpu")
    cfg = tuning.config_for(cpu, 64, 128, torch.bfloat16, batch=1024, T=6, W=16, rounding="rn", H=16, G=1)
    assert cfg["split_min_batch"] == 64
    assert cfg["write"] == {**tuning.DEFAULT["write"], "stages": 1}
    assert cfg["no_write"] == {**tuning.DEFAULT["no_write"], "ctas_per_sm": 8}
    assert cfg["coef"] == {**tuning.DEFAULT["coef"], "HB": 4}
    assert cfg["fused"] == {**tuning.DEFAULT["fused"], "num_warps": 2}
    # the schema-1 call (no batch, T, W, rounding, H, G) still works: largest bucket, reference step
    assert tuning.config_for(cpu, 64, 128, torch.bfloat16) == cfg
    assert tuning.config_for(cpu, 64, 128, torch.float16) == tuning.DEFAULT, "no entry of the dtype: DEFAULT"
    tuned({"write": {"stages": 4}, "split_min_batch": 7})
    cfg = tuning.config_for(cpu, 64, 128, torch.bfloat16, batch=1024, override={"write": {"num_warps": 8}})
    assert cfg["write"] == {**tuning.DEFAULT["write"], "stages": 4, "num_warps": 8}
    assert cfg["split_min_batch"] == 7 and cfg["no_write"]["ctas_per_sm"] == 8
    with tuning.overridden({"write": {"stages": 2}}):
        assert tuning.config_for(cpu, 64, 128, torch.bfloat16)["write"]["stages"] == 2
    assert tuning.config_for(cpu, 64, 128, torch.bfloat16)["write"]["stages"] == 4
    assert tuning.explain(cpu, 64, 128, torch.bfloat16, batch=8)["buckets"]["write"] == "64"


def test_unknown_card_gets_default(monkeypatch):
    monkeypatch.setattr(tuning, "card_name", lambda device: "NO_SUCH_CARD")
    tuning.reload()
    try:
        assert tuning.config_for(torch.device("cpu"), 64, 128, torch.int8, batch=8) == tuning.DEFAULT
    finally:
        tuning.reload()


def test_merge_entries_merges_buckets_by_launch_and_keeps_provenance():
    base = copy.deepcopy(LOOKUP_TABLE)
    base["entries"][0]["batches"]["1"]["fused"]["write"] = {"maxnreg": 96}      # a replay-form override
    new_prov = dict(PROV, commit="1111111")
    tuned = _entry(split_min_batch=16, batches={"1": {"fused": {"num_warps": 8, "BLOCK_P": 32}},
                                                 "8": {"coef": {"HB": 2}}})
    fresh = _entry(state="int8", batches={"8": {"coef": {"HB": 2}}})
    merged = tables.validate(tables.merge_entries(base, [tuned, fresh], new_prov), tuning.DEFAULT)
    assert len(merged["entries"]) == 6 and merged["provenance"] == new_prov
    got = {tables.entry_key(e): e for e in merged["entries"]}
    e = got[tables.entry_key(tuned)]
    assert e["split_min_batch"] == 16 and e["provenance"] == new_prov
    # bucket 1: the tuned fused fields replace, the untuned override stays; buckets 64 and 1024 untouched
    assert e["batches"]["1"] == {"fused": {"num_warps": 8, "BLOCK_P": 32, "write": {"maxnreg": 96}}}
    assert e["batches"]["8"] == {"coef": {"HB": 2}}
    assert e["batches"]["64"] == LOOKUP_TABLE["entries"][0]["batches"]["64"]
    assert got[tables.entry_key(fresh)]["provenance"] == new_prov
    assert got[("bfloat16", "sr", 6, 16, 16, 64, 128, 1)]["provenance"] == PROV
    assert base["entries"][0]["batches"]["1"]["fused"] == {"num_warps": 2, "write": {"maxnreg": 96}}, \
        "the base table is not modified"


class _Recorder:
    """Stands in for a Triton kernel: records each launch's keyword arguments."""

    def __init__(self, name, seen):
        self.name, self.seen = name, seen

    def __getitem__(self, grid):
        return lambda **kw: self.seen.append((self.name, kw))


def test_launcher_asks_the_table_with_its_step(test_card, monkeypatch):
    """checkpointing_ssu passes batch, T, W, rounding, H and G to config_for: at batch 3 (nearest
    bucket 1 of the only H=4, P=16 entry) its write main gets that bucket's stages, not bucket 64's."""
    from specssm.ops import checkpointing_ssu
    from specssm.step import launch as step_launch
    from tests.helpers.steps import make_step
    table = {"schema": 2, "card": "TEST", "provenance": PROV, "entries": [
        _entry(state="float32", T=4, H=4, P=16, N=16, G=2, batches={"1": {"write": {"stages": 3}},
                                                                     "64": {"write": {"stages": 1}}}),
        _entry(state="float32", T=5, H=4, P=16, N=16, G=2, batches={"1": {"write": {"stages": 4}}})]}
    (test_card / "TEST.json").write_text(tables.dumps(table))
    tuning.reload()
    calls, seen = [], []
    real = tuning.config_for
    monkeypatch.setattr(tuning, "config_for", lambda *a, **k: calls.append(k) or real(*a, **k))
    for name in ("fused_kernel", "coef_kernel", "main_kernel"):
        monkeypatch.setattr(step_launch, name, _Recorder(name, seen))
    cache, ins = make_step(batch=3, T=4, pnat=[14, 3, 13], act=torch.float32, seed=2)
    checkpointing_ssu(**ins, **cache.op_kwargs(0), launch="split")
    assert calls == [dict(batch=3, T=4, W=16, rounding="rn", H=4, G=2)]
    # the write main from the table's bucket 1, the no-write main from DEFAULT (no bucket configures it)
    assert [(kw["WRITE"], kw["STAGES"]) for name, kw in seen if name == "main_kernel"] == [(True, 3), (False, 2)]


@pytest.mark.parametrize("launch", ["dynamic", "split", "always_write"])
def test_launch_configs_reach_their_launches(launch, monkeypatch, tuned):
    """Each launch gets its own fields: the fused kernel its top-level config in its dynamic launch, the
    coefficient kernel and the two mains theirs (a no-write register cap leaked into another launch once
    and spilled)."""
    from specssm.ops import always_write_ssu, checkpointing_ssu
    from specssm.step import launch as step_launch
    from tests.helpers.steps import make_step
    seen = []
    for name in ("fused_kernel", "coef_kernel", "main_kernel"):
        monkeypatch.setattr(step_launch, name, _Recorder(name, seen))
    tuned({
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
