"""The tuner's knob space (specssm/tune/space.py): declared knobs match the launcher's config fields,
clamped knobs are dropped as duplicates of what runs, and the analytic rules (tile vs P, TMA boxes,
programs per SM: warps, registers, shared memory) drop exactly the points computed by hand here."""
import pytest

from specssm.step import tables, tuning
from specssm.tune import space
from specssm.tune.space import FAMILIES, KNOBS, Target


def tgt(state="float32", T=6, W=16, H=16, P=64, N=128, G=1, batch=1024, sms=132):
    return Target(state, "rn", T, W, H, P, N, G, batch, sms)


def main_knobs(**kw):
    return {"BLOCK_P": 64, "num_warps": 4, "stages": 2, "ctas_per_sm": 4, "tma": True, "maxnreg": None, **kw}


def test_knobs_are_config_fields_and_hold_the_defaults():
    for launch, knobs in KNOBS.items():
        fields = set(tables.FUSED_SUB_FIELDS) if launch.startswith("fused.") else set(tuning.DEFAULT[launch])
        assert {k.name for k in knobs} <= fields, launch
        for k in knobs:
            assert space.default_knobs(launch)[k.name] in k.values, f"DEFAULT's {launch}.{k.name} is not a point"
            assert all(tables.FIELD_CHECKS[k.name][0](v) for v in k.values), f"{launch}.{k.name} has unloadable values"
    for fam in FAMILIES.values():
        for launch, names in fam.blocks:
            assert launch in fam.launches and set(names) <= {k.name for k in KNOBS[launch]}
        covered = {(launch, n) for launch, names in fam.blocks for n in names}
        assert covered == {(launch, k.name) for launch in fam.launches for k in KNOBS[launch]}, "every knob in a block"


@pytest.mark.parametrize("launch,knobs,t,reason", [
    # HB: the launcher takes the largest power of two dividing H/G = 2
    ("coef", {"HB": 4, "num_warps": 2}, tgt(H=16, G=8), "coef.HB=4 runs as 2"),
    ("coef", {"HB": 2, "num_warps": 2, "maxnreg": None}, tgt(H=16, G=8), None),
    # tiles: P=32 clamps 64 to 32; N=256 allows 8192 / 256 = 32 rows; P=80: 32 and 64 leave a partial tile
    ("write", main_knobs(BLOCK_P=64), tgt(P=32), "write.BLOCK_P=64 runs as 32"),
    ("write", main_knobs(BLOCK_P=64), tgt(N=256), "write.BLOCK_P=64 runs as 32"),
    ("write", main_knobs(BLOCK_P=32), tgt(P=80), "write.BLOCK_P=32 neither divides P=80 nor covers it"),
    ("write", main_knobs(BLOCK_P=16), tgt(P=80), None),
    # token tile: T=12 runs a tile of 16 whatever TN_MIN says
    ("fused", {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "TN_MIN": 16, "tma": False}, tgt(T=12),
     "fused.TN_MIN=16 runs as 8"),
    ("fused", {"BLOCK_P": 64, "num_warps": 4, "maxnreg": 128, "TN_MIN": 16, "tma": False}, tgt(T=6), None),
    # TMA needs 16-byte rows: N=20 bf16 rows are 40 bytes
    ("no_write", main_knobs(BLOCK_P=16), tgt(state="bfloat16", P=16, N=20), "no_write.tma=True runs as False"),
    # programs per SM beyond the tiles: batch 1 has 16 tiles (one per head), all on one program per SM;
    # batch 16 has 256 tiles: two programs per SM cover them
    ("write", main_knobs(ctas_per_sm=2), tgt(batch=1), "write.ctas_per_sm=2 runs as 1"),
    ("write", main_knobs(ctas_per_sm=4), tgt(batch=16), "write.ctas_per_sm=4 runs as 2"),
    ("write", main_knobs(ctas_per_sm=2), tgt(batch=16), None),
    ("write", main_knobs(ctas_per_sm=8, tma=False), tgt(batch=64), None),     # 1024 tiles > 4 x 132
    # registers: 4 programs x 4 warps x 32 x 168 = 86016 > 65536; x 128 = 65536 fits exactly
    ("write", main_knobs(maxnreg=168), tgt(), "write: 4 programs x 4 warps x 32 x 168 registers exceed 65536 per SM"),
    ("write", main_knobs(maxnreg=128), tgt(), None),
    # shared memory: an fp32 64 x 128 TMA tile is 32 KiB; 8 programs need 256 KiB > 228 KiB; bf16 128 KiB fits
    ("no_write", main_knobs(ctas_per_sm=8, num_warps=2), tgt(),
     "no_write: 8 programs x a 32768-byte TMA tile exceed 233472 bytes of shared memory"),
    ("no_write", main_knobs(ctas_per_sm=8, num_warps=2), tgt(state="bfloat16"), None),
    ("no_write", main_knobs(ctas_per_sm=8, num_warps=2, tma=False), tgt(), None),
])
def test_launch_rules(launch, knobs, t, reason):
    assert space.launch_reason(launch, knobs, t) == reason


def test_counts_by_hand():
    # coef at H/G = 2: HB in {1, 2} x 4 warp counts x 4 register caps
    assert len(space.launch_points("coef", tgt(H=16, G=8))) == 32
    # fused at T=6 (token tiles 8 and 16 differ), P=64, N=128: 3 x 4 x 4 x 2 x 2, nothing clamped
    assert len(space.launch_points("fused", tgt(T=6))) == 192
    assert len(space.launch_points("fused", tgt(T=12))) == 96
    # write main at P=80 (16-row tiles only), batch 1 (80 tiles: one program per SM) in bf16:
    # 4 warps x 4 stages x 1 ctas x 2 tma x 4 caps x 2 prefetch x 2 column splits x 2 streams; int8 rows
    # keep their columns whole
    assert len(space.launch_points("write", tgt(state="bfloat16", P=80, batch=1))) == 1024
    assert len(space.launch_points("write", tgt(state="int8", P=80, batch=1))) == 512
    assert space.launch_reason("write", {**space.default_knobs("write"), "col_split": 2},
                               tgt(state="int8")) == "write.col_split=2 runs as 1"
    fam, t = FAMILIES["split"], tgt(batch=64)
    want = 1
    for launch in fam.launches:
        want *= len(space.launch_points(launch, t))
    assert space.count_valid(fam, t) == want
    small = tgt(H=16, G=8, batch=1)
    assert space.count_valid(FAMILIES["replay"], small) == len(space.all_points(FAMILIES["replay"], small)) == 64 * 64


def test_block_neighbors_change_only_their_block():
    fam, t = FAMILIES["split"], tgt(batch=64)
    start = space.default_point(fam, t)
    block = ("write", ("ctas_per_sm", "maxnreg"))
    pts = space.block_neighbors(fam, start, block, t)
    for p in pts:
        assert p["coef"] == start["coef"] and p["no_write"] == start["no_write"]
        assert {k for k in p["write"] if p["write"][k] != start["write"][k]} <= {"ctas_per_sm", "maxnreg"}
        assert space.point_reason(fam, p, t) is None
    # 7 x 4 pairs minus the start, minus those over 65536 registers at 4 warps (168 from 4 programs on:
    # 4; 128 from 5: 3; 96 from 6: 2) and 8 programs uncapped (eight fp32 32 KiB TMA tiles exceed 228 KiB)
    assert len(pts) == 28 - 1 - (4 + 3 + 2) - 1


def test_default_point_runs_as_default_and_configs_round_trip():
    t = tgt(H=16, G=8)
    p = space.default_point(FAMILIES["split"], t)
    assert p["coef"] == {"HB": 2, "num_warps": 2, "maxnreg": None}, "DEFAULT's HB 8 runs as 2 at H/G = 2"
    assert space.config_of(p) == {"coef": {"HB": 2, "num_warps": 2, "maxnreg": None}, "write": p["write"],
                                  "no_write": p["no_write"]}
    rp = space.default_point(FAMILIES["replay"], t)
    over = space.override_of({"family": "replay", "point": rp})
    assert over["fused"]["write"] == {"num_warps": 4, "maxnreg": 168, "tma": False, "TN_MIN": 8}
    assert over["fused"]["BLOCK_P"] == 64 and over["fused"]["no_write"]["maxnreg"] == 128
    # every override is a loadable table bucket
    entry = {"state": "float32", "rounding": "rn", "T": 6, "W": 16, "H": 16, "P": 64, "N": 128, "G": 8,
             "batches": {"1": over, "2": space.config_of(p)}}
    tables.validate({"schema": 2, "card": "X", "provenance": dict.fromkeys(tables.PROVENANCE_FIELDS, "x"),
                     "entries": [entry]}, tuning.DEFAULT)


def test_describe():
    p = {"coef": {"HB": 4, "num_warps": 1}, "write": main_knobs(tma=False, maxnreg=168)}
    assert space.describe(p) == "coef HB4 w1 | write P64 w4 s2 c4 ptr r168"
