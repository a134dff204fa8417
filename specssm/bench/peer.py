"""Peers `specssm bench --peer NAME=PATH` times beside specssm: outside implementations of the same step.

The only peer is `trtllm`: TensorRT-LLM's Triton checkpointing kernel (the seed: docs/performance.md), entry
`replay_selective_state_update` of the package `trtllm_replay`. Its code is never part of this project:
it is imported at run time from the folder named on the command line (../shared/peers/README.md).

It runs on our checkpointing caches (docs/design.md, "The cache contract"). Its wrapper gathers our rings into its
native double-buffered scratch before its kernels and scatters the appends back after them; those torch
ops are not its cost, so only its kernels whose names contain `TIMED_KERNELS[name]` are timed.

Pure parts (argument parsing, loading, work items) run on a CPU; the step itself needs a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

PEERS = ("trtllm",)
PACKAGE = "trtllm_replay"
ENTRY_MODULE = "replay_selective_state_update"
ENTRY = "replay_selective_state_update"
# `_dynamic_precompute_kernel` and `_persistent_main_kernel` (one launch, or a write and a no-write launch)
TIMED_KERNELS = {"trtllm": ("precompute", "persistent")}
# Philox rounds of its stochastic rounding: the default of our checkpointing_ssu, so both draw alike
PHILOX_ROUNDS = 10
# Columns of its replay_work_items rows (its REPLAY_WORK_* constants; tests check them against the module)
WORK_ITEM_COLUMNS = ("position", "slot", "pnat", "buffer")
_MODULE_NAME = "_specssm_peer_trtllm_replay"   # private: never shadows an installed trtllm_replay
_EXPECTED = (f"'trtllm=PATH', PATH a folder holding {PACKAGE}/{ENTRY_MODULE}.py or that {PACKAGE} "
             f"folder itself")


@dataclass(frozen=True)
class PeerSpec:
    name: str
    folder: Path      # the package folder (holds __init__.py and the entry module)

    def label(self) -> str:
        return f"{self.name}={self.folder}"


def parse_peer(spec: str) -> PeerSpec:
    """`trtllm=PATH` -> PeerSpec; ValueError naming --peer, what it got and what it expects."""
    name, sep, path = (part.strip() for part in str(spec).partition("="))
    if not sep:
        what = "no NAME= before the path"
    elif name not in PEERS:
        what = f"unknown peer {name!r}; known: {', '.join(PEERS)}"
    elif not path:
        what = "an empty PATH"
    else:
        given = Path(path).expanduser()
        for folder in (given / PACKAGE, given):
            if (folder / f"{ENTRY_MODULE}.py").is_file() and (folder / "__init__.py").is_file():
                return PeerSpec(name, folder.resolve())
        what = ("no such folder" if not given.is_dir()
                else f"neither it nor {given / PACKAGE} holds __init__.py and {ENTRY_MODULE}.py")
    raise ValueError(f"--peer: expected {_EXPECTED}, got {spec!r} ({what})")


def load_module(peer: PeerSpec):
    """Import the peer's entry module from its folder (a package: its files import each other
    relatively) under a private name; a second call with the same folder reuses it."""
    sub = f"{_MODULE_NAME}.{ENTRY_MODULE}"
    pkg = sys.modules.get(_MODULE_NAME)
    if pkg is not None and Path(pkg.__file__).parent == peer.folder and sub in sys.modules:
        return sys.modules[sub]
    _forget()
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, peer.folder / "__init__.py",
                                                  submodule_search_locations=[str(peer.folder)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = pkg
    try:
        spec.loader.exec_module(pkg)
        return importlib.import_module(sub)
    except BaseException:
        _forget()
        raise


def _forget():
    for key in [k for k in sys.modules if k == _MODULE_NAME or k.startswith(_MODULE_NAME + ".")]:
        del sys.modules[key]


def load_entry(peer: PeerSpec):
    """The peer's step function."""
    fn = getattr(load_module(peer), ENTRY, None)
    if fn is None:
        raise ImportError(f"{peer.folder / ENTRY_MODULE}.py: expected a function {ENTRY}, found none")
    if not callable(fn):
        raise TypeError(f"{peer.folder / ENTRY_MODULE}.py: expected {ENTRY} to be a function, got {type(fn)}")
    return fn


def unsupported_reason(T: int, W: int) -> str | None:
    """Why the peer cannot run a case of these sizes on our caches (None: it can)."""
    # its window is the ring length minus T = max(W, T): its flush rule is ours only when W >= T
    if W < T:
        return f"trtllm: its window is ring length - T = max(W, T) = {T}, ours W = {W} (needs W >= T)"
    return None


def replay_work_items(plan, pnat, pad_slot_id: int = -1):
    """(n_writes, replay_work_items) of the peer from a built StepPlan: `(1,)` int32 write count and
    `(batch, 4)` int32 rows `[position in batch, slot, pnat, 0]` in the plan's order (write rows, then
    padding rows, then no-write rows). Padding rows keep `pad_slot_id` and pnat 0; the peer itself has no
    padding rows (the benchmark never passes any). The last column is its buffer index: 0, since its
    wrapper gathers our ring into buffer 0. A few device ops, no host sync; new tensors, so the plan may
    be rebuilt afterwards."""
    import torch
    batch = plan.batch
    order, slots = plan.order[:batch], plan.slots[:batch]
    live = slots != pad_slot_id
    row_pnat = torch.where(live, pnat[torch.where(live, slots, 0).long()].to(torch.int32), 0)
    items = torch.stack([order, slots, row_pnat, torch.zeros_like(order)], dim=1).to(torch.int32).contiguous()
    return plan.counts[0:1].clone(), items


def step_fn(entry, env, case, work_items):
    """fn(i, validate) running the peer on slot set i of `env` (a runner.Env built for checkpointing):
    the same caches, inputs and slot sets as our checkpointing strategy, as shipped (no tuning kwargs: its
    own table picks). `work_items[i]` = replay_work_items of slot set i. It mutates the same cache as
    our op does (state on write rows, ring appends): values only, the pnat mix and the plans stay."""
    layer = env.cache.layers[0]
    kw = {"state": layer.state, "x_cache": layer.x_cache, "B_cache": layer.B_cache, "dt_cache": layer.dt_cache,
          "ring_start": env.cache.ring_start, "prev_num_accepted_tokens": env.cache.pnat, "x": env.x, "dt": env.dt,
          "A": env.A, "B": env.B, "C": env.C, "out": env.out, "D": env.D, "z": env.z, "dt_bias": env.dt_bias,
          "dt_softplus": True, "philox_rounds": PHILOX_ROUNDS}
    if layer.state_scale is not None:
        kw["state_scales"] = layer.state_scale
    if case.rounding == "sr":
        kw["rand_seed"] = env.cache.seeds
    sets = env.slot_sets

    def fn(i, validate):   # validate: the peer checks its arguments on every call anyway
        n_writes, items = work_items[i]
        entry(**kw, state_batch_indices=sets[i], n_writes=n_writes, replay_work_items=items)
    return fn
