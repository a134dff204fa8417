"""The strategies `specssm bench` times, in one table: what sets each one's caches, op, cases and bytes apart.

The harness (cases, runner, floor) reads these fields instead of comparing strategy names, so a new
strategy is a new row here. A peer (`--peer`) is no strategy of ours: it runs on the caches of
`PEER_CACHES` (specssm/bench/peer.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str            # the rows' "strategy"
    op: str              # its entry point in specssm.ops
    label: str           # the rows' "variant" (checkpointing: ckpt/<launch>/<form>)
    window: bool         # keeps a history window W (always-write runs with W = 0: every row writes)
    ring: bool           # a checkpoint and x/B/dt rings per slot; else T states per slot and an index
    plan: bool           # its steps take a StepPlan, built per slot set and scenario
    variants: bool       # launch modes x no-write forms (--launch, --no-write-form), PDL (--pdl)
    launch: bool         # has a launch choice of its own (its rows' "launch" is "auto", not "-")
    scenarios: bool      # its pnat follows the scenario; else one case in scenario "any" (it always writes)
    rounding: bool       # takes rounding= and precision= (all-states stores in the state dtype: RN only)


STRATEGIES = {s.name: s for s in (
    Strategy("checkpointing", "checkpointing_ssu", "ckpt", window=True, ring=True, plan=True, variants=True,
             launch=True, scenarios=True, rounding=True),
    Strategy("always_write", "always_write_ssu", "always-write", window=False, ring=True, plan=False,
             variants=False, launch=True, scenarios=False, rounding=True),
    Strategy("all_states", "all_states_ssu", "all-states", window=False, ring=False, plan=False, variants=False,
             launch=False, scenarios=False, rounding=False),
)}
NAMES = tuple(STRATEGIES)
# the strategy whose caches, slot sets and pnat draws a peer runs on
PEER_CACHES = "checkpointing"


def get(name: str, arg: str = "strategy") -> Strategy:
    """The table row of `name`; ValueError naming `arg` otherwise."""
    if name not in STRATEGIES:
        raise ValueError(f"{arg}: expected one of {NAMES}, got {name!r}")
    return STRATEGIES[name]
