"""The tuner's run log: one JSON object per line, appended and synced as each measurement, compile
report and case result arrives, so an interrupted run (time budget, lost machine) loses at most the
record being written, and the next run (--resume) continues from it.

Record types:
  run       a tuner run started: argv, card, versions, date, commit (the provenance of what follows)
  request   one answered measurement request of a case: {"case", "seq", "kind" ("time" | "check"),
            "candidates", "rounds", "answer", "elapsed_s"}; a resumed run replays them by (case, seq)
  compile   an offline compile report: {"job": key, "report"}
  result    a finished case: its winner, times and how it was found
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class RunLog:
    def __init__(self, path):
        self.path = Path(path)
        self.runs, self.requests, self.compiles, self.results = [], {}, {}, {}
        if self.path.exists():
            self._read()

    def _read(self):
        raw = self.path.read_bytes()
        good = raw[:raw.rfind(b"\n") + 1]
        if len(good) != len(raw):
            # a record cut off by an interruption: drop it, so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(len(good))
        for line in good.decode().splitlines():
            if line.strip():
                self._index(json.loads(line))

    def _index(self, rec: dict):
        kind = rec.get("type")
        if kind == "run":
            self.runs.append(rec)
        elif kind == "request":
            self.requests[(rec["case"], rec["seq"])] = rec
        elif kind == "compile":
            self.compiles[rec["job"]] = rec["report"]
        elif kind == "result":
            self.results[rec["case"]] = rec

    def append(self, rec: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._index(rec)
