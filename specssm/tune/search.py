"""The tuner's search over one case (a family of launches at one target), and the loop over cases.

Measurements: a request times a list of candidates in `rounds` interleaved rounds (the GPU timer
replays one CUDA graph per candidate, round by round, order rotated each round) and returns per
candidate one sample per round (a median over the round's steps); decisions use medians of these.

Acceptance (`accepts`): a challenger replaces the incumbent only after a confirmation request that
times the two alone, interleaved, over `confirm_rounds` rounds in the same process: its median must be
at least `min_gain` below the incumbent's AND it must be faster in a strict majority of the paired
rounds. A lucky screening sample (the cheaper challenger of a chunk) is therefore not enough.

Search of a case:
  * exhaustive when the family has at most `exhaustive_limit` valid points: every valid point, in
    chunks of `chunk` candidates timed beside the incumbent; the best of a chunk, if its screening
    median beats the incumbent's by min_gain, goes to confirmation;
  * else block coordinate descent: from a start, for each block of coupled knobs (space.FAMILIES), the
    points that differ only in that block are screened and confirmed the same way; sweeps repeat until
    one changes nothing (at most `max_sweeps`); `restarts` more descents start from random valid points
    (seeded by the case, so a rerun makes the same draws), and their winners meet the first descent's in
    one more screening + confirmation;
  * the winner is timed against DEFAULT's point once more (the "tuned vs default" figures), and kept
    only if it passes the acceptance rule there too and, with checking on, its outputs match DEFAULT's.

Resumption: every request is answered by `Oracle`, which replays answers logged by an earlier run for
the same (case, request number) and measures only past them; the search is a deterministic function of
the answers, so a resumed run walks the same path and ends where an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import random
import statistics
import time
from dataclasses import dataclass

from specssm.tune import offline, space
from specssm.tune.space import FAMILIES, Target


class BudgetExhausted(Exception):
    """The time budget ran out before a measurement: the run stops; --resume continues."""


class LogMismatch(RuntimeError):
    """A logged request differs from the one this run makes: options or code changed since the log."""


@dataclass(frozen=True)
class Settings:
    rounds: int = 5                 # interleaved rounds of a screening request
    confirm_rounds: int = 7         # of a confirmation (challenger against incumbent)
    min_gain: float = 0.01          # a challenger must be this much faster (median)
    chunk: int = 12                 # candidates per screening request, beside the incumbent
    exhaustive_limit: int = 48      # valid points up to which a family is searched exhaustively
    max_sweeps: int = 3             # block coordinate descent sweeps per start
    restarts: int = 1               # descents from random valid points after the one from DEFAULT
    max_spill: int = 512            # offline compile: spill bytes per thread above which a point is dropped
    compile_check: bool = True      # drop points by offline sm_90 compile reports
    check: bool = True              # compare the winner's outputs with DEFAULT's before keeping it


@dataclass(frozen=True)
class Case:
    """One search: a family ("fused", "split", "replay") or the "crossover" between the fused and
    split winners at this target."""
    target: Target
    family: str

    @property
    def id(self) -> str:
        t = self.target
        return f"{t.state}/{t.rounding}/T{t.T}/W{t.W}/H{t.H}P{t.P}N{t.N}G{t.G}/b{t.batch}/{self.family}"


def candidate(family: str, point: dict) -> dict:
    return {"family": family, "point": point}


def median(xs) -> float:
    return float(statistics.median(xs))


def accepts(incumbent: list, challenger: list, min_gain: float) -> bool:
    """The acceptance rule on one confirmation request's paired rounds (module doc)."""
    wins = sum(c < i for i, c in zip(incumbent, challenger))
    return median(challenger) <= median(incumbent) * (1 - min_gain) and 2 * wins > len(incumbent)


class Oracle:
    """Answers a search's requests: from the log where this (case, request number) was answered before,
    else from the timer (then logged). Raises BudgetExhausted instead of starting a measurement after
    the deadline (clock() seconds)."""

    def __init__(self, log, timer, deadline=None, clock=time.monotonic, on_live=None):
        self.log, self.timer, self.deadline, self.clock, self.on_live = log, timer, deadline, clock, on_live
        self.seq: dict[str, int] = {}
        self.live = self.replayed = 0

    def _ask(self, case: Case, kind: str, candidates: list, rounds: int, measure):
        seq = self.seq.get(case.id, 0)
        self.seq[case.id] = seq + 1
        rec = self.log.requests.get((case.id, seq))
        if rec is not None:
            if rec["kind"] != kind or rec["candidates"] != candidates or rec["rounds"] != rounds:
                raise LogMismatch(f"{self.log.path}: request {seq} of {case.id} was {rec['kind']} of "
                                  f"{len(rec['candidates'])} candidates, this run asks {kind} of {len(candidates)}: "
                                  f"the options or the code changed since; tune into another --out")
            self.replayed += 1
            return rec["answer"]
        if self.deadline is not None and self.clock() >= self.deadline:
            raise BudgetExhausted(case.id)
        t0 = self.clock()
        answer = measure((case.id, seq))
        elapsed = self.clock() - t0
        self.log.append({"type": "request", "case": case.id, "seq": seq, "kind": kind, "candidates": candidates,
                         "rounds": rounds, "answer": answer, "elapsed_s": round(elapsed, 3)})
        self.live += 1
        if self.on_live:
            self.on_live(case, kind, candidates, rounds, answer, elapsed)
        return answer

    def time(self, case: Case, candidates: list, rounds: int) -> list:
        return self._ask(case, "time", candidates, rounds,
                         lambda req: self.timer.time(case.target, candidates, rounds, req))

    def check(self, case: Case, cand: dict, reference: dict) -> dict:
        return self._ask(case, "check", [cand, reference], 1,
                         lambda req: self.timer.check(case.target, cand, reference))


class Pruner:
    """Offline-compile pruning of points, reports cached in the log (`compile` records)."""

    def __init__(self, log, settings: Settings, compiler=offline.compile_jobs):
        self.log, self.settings, self.compiler = log, settings, compiler
        self.compiled = 0

    def _jobs(self, t: Target, launches, point: dict) -> list:
        base = space.default_knobs("fused")
        return [(launch, offline.job_for(t, launch, point[launch], base)) for launch in launches]

    def reasons(self, t: Target, family, points: list, launches=None) -> list:
        """Why each point is ruled out by the compile reports of `launches` (default: all of the
        family's; a descent passes the block's launch only: the others are the incumbent's, which
        is timed whatever its report says)."""
        if not self.settings.compile_check or not points:
            return [None] * len(points)
        per_point = [self._jobs(t, launches or family.launches, p) for p in points]
        todo = {}
        for jobs in per_point:
            for _, job in jobs:
                key = offline.job_key(job)
                if key not in self.log.compiles:
                    todo[key] = job
        if todo:
            reports = self.compiler(list(todo.values()))
            self.compiled += len(todo)
            for key, report in zip(todo, reports):
                self.log.append({"type": "compile", "job": key, "report": report})
        out = []
        for p, jobs in zip(points, per_point):
            why = None
            for launch, job in jobs:
                why = offline.report_reason(self.log.compiles[offline.job_key(job)], launch, p[launch],
                                            self.settings.max_spill)
                if why:
                    break
            out.append(why)
        return out


def _seed_of(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


class Search:
    def __init__(self, oracle: Oracle, pruner: Pruner, settings: Settings, progress=None):
        self.oracle, self.pruner, self.settings, self.progress = oracle, pruner, settings, progress

    # ---- building blocks -------------------------------------------------------------------------
    def _keep(self, case: Case, points: list, launches=None) -> list:
        fam = FAMILIES[case.family]
        reasons = self.pruner.reasons(case.target, fam, points, launches)
        return [p for p, why in zip(points, reasons) if why is None]

    def _confirm(self, case: Case, inc: dict, ch: dict):
        a, b = self.oracle.time(case, [inc, ch], self.settings.confirm_rounds)
        return accepts(a, b, self.settings.min_gain), median(a), median(b)

    def _improve(self, case: Case, inc: dict, points: list):
        """Screen `points` (as candidates of the case's family) against the incumbent, chunk by chunk;
        confirm each chunk's best that screens faster. Returns (incumbent, changed)."""
        s, changed = self.settings, False
        cands = [candidate(case.family, p) for p in points]
        for i in range(0, len(cands), s.chunk):
            chunk = cands[i:i + s.chunk]
            samples = self.oracle.time(case, [inc] + chunk, s.rounds)
            meds = [median(x) for x in samples]
            j = min(range(1, len(meds)), key=lambda k: meds[k])
            if meds[j] < meds[0] * (1 - s.min_gain):
                ok, _, _ = self._confirm(case, inc, chunk[j - 1])
                if ok:
                    inc, changed = chunk[j - 1], True
        return inc, changed

    def _descent(self, case: Case, start: dict) -> dict:
        fam, t, inc = FAMILIES[case.family], case.target, start
        for _ in range(self.settings.max_sweeps):
            changed = False
            for block in fam.blocks:
                pts = self._keep(case, space.block_neighbors(fam, inc["point"], block, t), (block[0],))
                inc, ch = self._improve(case, inc, pts)
                changed |= ch
            if not changed:
                break
        return inc

    def _random_start(self, case: Case, rng: random.Random) -> dict | None:
        fam = FAMILIES[case.family]
        for _ in range(20):
            p = space.random_point(fam, case.target, rng)
            if self._keep(case, [p]):
                return candidate(case.family, p)
        return None

    # ---- one case --------------------------------------------------------------------------------
    def run_case(self, case: Case) -> dict:
        """The case's result record (not yet logged)."""
        s, fam, t = self.settings, FAMILIES[case.family], case.target
        default = candidate(case.family, space.default_point(fam, t))
        n_valid = space.count_valid(fam, t)
        default_reason = space.point_reason(fam, default["point"], t) or \
            self.pruner.reasons(t, fam, [default["point"]])[0]
        if n_valid <= s.exhaustive_limit:
            method = "exhaustive"
            pts = self._keep(case, [p for p in space.all_points(fam, t) if p != default["point"]])
            best, _ = self._improve(case, default, pts)
        else:
            method = f"bcd x{1 + s.restarts}"
            rng = random.Random(_seed_of(case.id))
            starts = [default] + [self._random_start(case, rng) for _ in range(s.restarts)]
            winners = [self._descent(case, st) for st in starts if st is not None]
            best = winners[0]
            others = []
            for w in winners[1:]:
                if w != best and w not in others:
                    others.append(w)
            if others:
                best, _ = self._improve(case, best, [w["point"] for w in others])
        if best != default:
            ok, default_us, tuned_us = self._confirm(case, default, best)
        else:
            ok = False
            (a,) = self.oracle.time(case, [default], s.confirm_rounds)
            default_us = tuned_us = median(a)
        check = "not needed"
        if ok and s.check:
            verdict = self.oracle.check(case, best, default)
            check = "ok" if verdict["ok"] else f"failed: {verdict['detail']}"
            ok = verdict["ok"]
        if not ok:
            best, tuned_us = default, default_us
        return {"type": "result", "case": case.id, "family": case.family, "target": t.as_dict(),
                "point": best["point"], "tuned_us": tuned_us, "default_us": default_us, "method": method,
                "valid_points": n_valid, "default_reason": default_reason, "check": check,
                "requests": self.oracle.seq.get(case.id, 0)}

    def run_crossover(self, case: Case, fused: dict, split: dict) -> dict:
        """Time the fused and split winners of one target head to head: which launch="auto" should take."""
        a, b = self.oracle.time(case, [candidate("fused", fused["point"]), candidate("split", split["point"])],
                                self.settings.confirm_rounds)
        fused_us, split_us = median(a), median(b)
        return {"type": "result", "case": case.id, "family": "crossover", "target": case.target.as_dict(),
                "winner": "split" if split_us < fused_us else "fused", "fused_us": fused_us, "split_us": split_us,
                "requests": self.oracle.seq.get(case.id, 0)}


def estimate_candidates(case: Case, settings: Settings) -> int:
    """Roughly how many candidate timings a case takes (for the ETA): exhaustive, every valid point;
    descent, two sweeps of every block's neighbours per start."""
    if case.family == "crossover":
        return 2
    fam, t = FAMILIES[case.family], case.target
    n = space.count_valid(fam, t)
    if n <= settings.exhaustive_limit:
        return n + 2
    start = space.default_point(fam, t)
    per_sweep = sum(len(space.block_neighbors(fam, start, b, t)) + 2 for b in fam.blocks)
    return 2 * per_sweep * (1 + settings.restarts) + 4


def run_cases(cases: list, search: Search, log, run_index: int, on_result=None) -> int:
    """Search the cases in order, skipping those with a logged result; append each result. Returns the
    number of cases left undone (BudgetExhausted stops the loop; what was measured stays logged)."""
    for n, case in enumerate(cases):
        if case.id in log.results:
            continue
        try:
            if case.family == "crossover":
                fused = log.results.get(Case(case.target, "fused").id)
                split = log.results.get(Case(case.target, "split").id)
                if fused is None or split is None:
                    continue
                rec = search.run_crossover(case, fused, split)
            else:
                rec = search.run_case(case)
        except BudgetExhausted:
            return sum(1 for c in cases[n:] if c.id not in log.results)
        rec["run"] = run_index
        log.append(rec)
        if on_result:
            on_result(case, rec)
    return 0
