"""A synthetic cost model in place of the GPU timer: the tuner's search, log, resume and tables run on a
CPU with it (`specssm tune --synthetic`, and the tests). Not a model of any card.

Cost of a candidate = base(family, target) x (1 + 0.04 x sum over knobs of the squared distance, in
positions of the knob's value list, from PREFERRED): separable, so its optimum over the valid points is
PREFERRED wherever PREFERRED is valid. The fused family's base grows faster with the batch than the
split family's, so the crossover lies between batch 8 and 64. Noise is multiplicative, Gaussian and keyed
by (seed, request, candidate, round): the same request gets the same samples in every run, which is what
lets a resumed run be compared with an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import random

from specssm.tune.space import KNOBS, STATE_BYTES, Target

_MAIN = {"BLOCK_P": 32, "num_warps": 4, "stages": 3, "ctas_per_sm": 2, "tma": True, "maxnreg": 168, "prefetch": False}
PREFERRED = {
    "coef": {"HB": 4, "num_warps": 1, "maxnreg": None},
    "write": {**_MAIN, "col_split": 1, "side_stream": False},
    "no_write": {**_MAIN, "maxnreg": 128},
    "fused": {"BLOCK_P": 32, "num_warps": 4, "maxnreg": 168, "TN_MIN": 16, "tma": True},
    "fused.write": {"num_warps": 8, "maxnreg": 128, "tma": False, "TN_MIN": 16},
    "fused.no_write": {"num_warps": 8, "maxnreg": 96, "tma": False, "TN_MIN": 8},
}
WEIGHT = 0.04


def base_us(family: str, t: Target) -> float:
    rows = t.batch * t.H * t.P * t.N * STATE_BYTES[t.state] / (16 * 64 * 128 * 4)
    if family == "fused":
        return 3.5 + 0.45 * rows
    return 6.0 + 0.25 * rows


def knob_cost(launch: str, knobs: dict) -> float:
    total = 0.0
    for k in KNOBS[launch]:
        want = PREFERRED[launch][k.name]
        total += (k.values.index(knobs[k.name]) - k.values.index(want)) ** 2
    return total


def cost_us(t: Target, cand: dict) -> float:
    point = cand["point"]
    return base_us(cand["family"], t) * (1 + WEIGHT * sum(knob_cost(launch, knobs) for launch, knobs in point.items()))


class SyntheticTimer:
    card = "SYNTH"
    device_name = "synthetic cost model (specssm/tune/synthetic.py)"
    num_sms = 132

    def __init__(self, noise: float = 0.0, seed: int = 0, cost=cost_us, bad_outputs=()):
        self.noise, self.seed, self.cost = noise, seed, cost
        self.bad_outputs = [json.dumps(p, sort_keys=True) for p in bad_outputs]
        self.calls = 0          # requests answered (time and check)

    def _gauss(self, *key) -> float:
        h = hashlib.sha1(json.dumps([self.seed, *key], sort_keys=True).encode()).hexdigest()
        return random.Random(int(h[:16], 16)).gauss(0.0, 1.0)

    def time(self, target: Target, candidates: list, rounds: int, request) -> list:
        self.calls += 1
        out = []
        for c in candidates:
            base = self.cost(target, c)
            out.append([base * (1 + self.noise * self._gauss(list(request), c, r)) for r in range(rounds)])
        return out

    def check(self, target: Target, cand: dict, reference: dict) -> dict:
        self.calls += 1
        bad = json.dumps(cand["point"], sort_keys=True) in self.bad_outputs
        return {"ok": not bad, "detail": "outputs differ from DEFAULT's (synthetic)" if bad else ""}
