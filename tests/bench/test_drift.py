"""`specssm drift`: long runs of the float64 reference step on rounded / quantized checkpoints.

An fp32 checkpoint stays at the fp32 rounding level over hundreds of steps and bf16 sits far above it;
in a controlled decay-only run (every step decays the state by less than half a bf16 ulp) RN stores the
same value again and again (biased: the state never decays) while SR follows the truth on average; int8
RN drops weak persistent inputs of a slow head that SR keeps; the CLI's quick run writes the table, the
JSON and the plot of the whole matrix.
"""
import json
import math

import pytest

from specssm.bench import drift
from specssm.bench.drift import Config
from specssm.cli import main as cli_main


def _by_name(res):
    return {r["name"]: r["summary"] for r in res["configs"]}


def test_fp32_stays_near_1e6_and_bf16_drifts_more():
    setup = drift.Setup(steps=300, rows=2, H=2, P=8, N=16, seed=3)
    cfgs = [Config("fp32", "rn", "W16"), Config("fp32", "rn", "always"), Config("bf16", "rn", "W16")]
    res = drift.run_group(setup, cfgs, progress=False)
    m = _by_name(res)
    for name in ("fp32-rn-W16", "fp32-rn-always"):
        # every (row, head, step) within 1e-6 relative, and the checkpoint really was rounded
        assert 0 < m[name]["state_max_single"] < 1e-6, (name, m[name])
        assert 0 < m[name]["out_max"] < 1e-6, (name, m[name])
        assert 0 < m[name]["flush_err_rms"] < 1e-7, (name, m[name])
    assert m["bf16-rn-W16"]["state_rms"] > 1000 * m["fp32-rn-W16"]["state_rms"]
    assert m["bf16-rn-W16"]["out_rms"] > 1000 * m["fp32-rn-W16"]["out_rms"]
    # the run flushed at the rate of the benchmarks' histogram (~0.31 at W = 16, T = 6); always-write: 1
    assert 0.25 < m["fp32-rn-W16"]["write_fraction"] < 0.37
    assert m["fp32-rn-always"]["write_fraction"] == 1.0
    assert len(res["configs"][0]["series"]["state"]) == 300


def test_sr_mean_error_is_unbiased_where_rn_stagnates():
    # no inputs, one slow head: each always-write flush decays the state by at most 6 * 2.5e-4 = 1.5e-3
    # relative, below half a bf16 ulp (>= 2**-9 ~ 1.95e-3 relative), so RN rounds back to the stored value
    lam = 2.5e-4
    setup = drift.Setup(steps=40, rows=16, H=1, P=4, N=8, seed=5, A=(-1.0,), dt_center=(lam,), dt_noise=0.0,
                        x_scale=0.0)
    res = drift.run_group(setup, [Config("bf16", "rn", "always"), Config("bf16", "sr", "always")],
                          progress=False)
    m = _by_name(res)
    decayed = lam * res["tokens_per_row"]           # the truth decayed by ~exp(-decayed); RN did not
    rn, sr = m["bf16-rn-always"]["radial_bias_end"], m["bf16-sr-always"]["radial_bias_end"]
    assert rn > 0.5 * decayed, (rn, decayed)
    # SR: mean over 16 independent slots x 32 elements; its noise is ~0.1% here, RN's bias ~3.8%
    assert abs(sr) < 0.1 * rn, (sr, rn)
    assert m["bf16-sr-always"]["state_end"] > 0     # SR did round (a random walk around the truth)


def test_int8_rn_drops_weak_persistent_inputs_sr_keeps_them():
    # a slow head whose state is large next to weak, persistent inputs: each flush adds less than half
    # an int8 code step, so RN rounds the increments away (input gain << 1, the error grows) while SR
    # keeps them on average (gain ~1) with a smaller error
    setup = drift.Setup(steps=200, rows=2, H=1, P=8, N=16, seed=1, A=(-1.0,), dt_center=(2e-5,), x_scale=0.05,
                        coherent=1.0)
    res = drift.run_group(setup, [Config("int8", "rn", "W16"), Config("int8", "sr", "W16")], progress=False)
    by = {r["name"]: r for r in res["configs"]}
    g_rn, g_sr = by["int8-rn-W16"]["per_head"]["input_gain"][0], by["int8-sr-W16"]["per_head"]["input_gain"][0]
    assert g_rn < 0.8, g_rn
    assert abs(g_sr - 1.0) < 0.1, g_sr
    assert by["int8-sr-W16"]["summary"]["state_end"] < by["int8-rn-W16"]["summary"]["state_end"]


def test_cli_quick_writes_table_json_png(tmp_path, capsys):
    rc = cli_main(["drift", "--quick", "--out", str(tmp_path), "--jobs", "2"])
    assert rc == 0
    cfgs = drift.make_configs()
    assert len(cfgs) == 27                          # fp32 RN + 4 dtypes x 2 roundings, x 3 policies
    md = (tmp_path / "results.md").read_text()
    for c in cfgs:
        assert f"| {c.dtype} | {c.rounding.upper()} | {c.policy} |" in md
    data = json.loads((tmp_path / "drift.json").read_text())
    assert [r["name"] for r in data["configs"]] == [c.name for c in cfgs]
    for r in data["configs"]:
        assert len(r["series"]["state"]) == len(r["series"]["out"]) == drift.QUICK_STEPS
        for key in ("state_rms", "state_max", "state_end", "out_rms", "out_max", "out_end", "flush_err_rms"):
            v = r["summary"][key]
            assert math.isfinite(v) and v > 0, (r["name"], key, v)
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "| dtype | rnd | policy |" in out.out
    # the precision order of the formats shows even in a short run
    s = {r["name"]: r["summary"]["state_rms"] for r in data["configs"]}
    for pol in drift.POLICIES:
        chain = [s[f"fp32-rn-{pol}"], s[f"fp16-rn-{pol}"], s[f"bf16-rn-{pol}"], s[f"int8-rn-{pol}"],
                 s[f"fp8-rn-{pol}"]]
        assert chain == sorted(chain), (pol, chain)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dtypes"):
        drift.make_configs(["fp64"])
    with pytest.raises(ValueError, match="policies"):
        drift.make_configs(policies=["W4"])
    with pytest.raises(ValueError, match="dt_center"):
        drift.Setup(H=2, dt_center=(1e-3,)).check()
    with pytest.raises(SystemExit):
        drift.main(["--dtypes", "int4"])
