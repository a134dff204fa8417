"""The GPU timer's output check (specssm/tune/gpu.py `compare`) on the CPU interpreter at a tiny shape:
a candidate's config reaches the launches through tuning.overridden, the caches are restored after
each run, equal math passes, and a wrong output is caught."""
import pytest
import torch

from specssm.tune import gpu, space
from specssm.tune.search import candidate

pytestmark = pytest.mark.interpreter


def test_compare_passes_other_tilings_and_catches_wrong_outputs(monkeypatch):
    t = space.Target("float32", "rn", 4, 16, 4, 32, 16, 2, 3, 4)
    env = gpu.Env(t, torch.device("cpu"), sets=1)
    default = candidate("split", space.default_point(space.FAMILIES["split"], t))
    other = dict(default["point"], coef={"HB": 1, "num_warps": 1},
                 write=dict(default["point"]["write"], BLOCK_P=16))
    before = [x.clone() for x in (env.cache.layers[0].state, env.cache.layers[0].x_cache)]
    seen = []
    real_step = gpu.Env.step

    def spy(self, cand, i):
        from specssm.step import tuning
        seen.append(tuning.config_for(torch.device("cpu"), 32, 16, torch.float32)["write"]["BLOCK_P"])
        return real_step(self, cand, i)

    monkeypatch.setattr(gpu.Env, "step", spy)
    assert gpu.compare(env, candidate("split", other), default) == {"ok": True, "detail": ""}
    assert seen == [16, 32], "each run under its own config (DEFAULT's 64-row tile runs as 32 at P=32)"
    assert all(torch.equal(a, b) for a, b in zip(before, (env.cache.layers[0].state, env.cache.layers[0].x_cache)))

    def wrong(self, cand, i):
        real_step(self, cand, i)
        if cand["point"] == other:
            self.kw["out"].mul_(1.1)

    monkeypatch.setattr(gpu.Env, "step", wrong)
    verdict = gpu.compare(env, candidate("split", other), default)
    assert not verdict["ok"] and verdict["detail"].startswith("out: max |diff|")
