"""The per-layer SSM cache of the ring contract, its slots and the on-device commit.

Per layer: `state (slots, H, P, N)`, `state_scale (slots, H, P)` fp32 for 8-bit states, and the input
rings `x_cache (slots, H, L, P)`, `B_cache (slots, G, L, N)` (activation dtype), `dt_cache (slots, H, L)`
fp32. Per slot, shared by all layers: `ring_start`, `pnat` (int32) and Philox `seeds` (int64).

Per-slot arrays keep one extra scratch entry at index `num_slots`: padding rows of a commit are
redirected there, so the commit needs no boolean masking (no host sync, CUDA-graph safe).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from specssm import library
from specssm._checks import FLOAT_ACT_DTYPES, MAX_WINDOW, STATE_DTYPES, check_slots_host, check_tensor
from specssm.cache import faults as flt
from specssm.cache import transfer
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state, encode_state, is_quantized

STRATEGIES = ("checkpointing", "always_write", "all_states")


@dataclass
class LayerCache:
    state: torch.Tensor                  # (slots, H, P, N); all_states: (slots, T, H, P, N)
    state_scale: torch.Tensor | None     # (slots, H, P) fp32 for int8/fp8/int16 states
    x_cache: torch.Tensor | None         # (slots, H, L, P)
    B_cache: torch.Tensor | None         # (slots, G, L, N)
    dt_cache: torch.Tensor | None        # (slots, H, L) fp32


class SSMCache:
    """Cache of all Mamba2 layers of a model for one strategy.

    Args:
        num_layers, num_slots: layers and request slots.
        nheads, head_dim, d_state, ngroups: H, P, N, G (per tensor-parallel rank).
        max_tokens: T, the most tokens a row verifies in one step (draft length + 1).
        window: W, history window of the checkpointing strategy (<= 16). Ignored by the others.
        strategy: "checkpointing" (ring of L = max(W, T) + T rows), "always_write" (W = 0, L = 2T)
            or "all_states" (no ring; T states per slot, the accepted one selected by index).
    """

    def __init__(self, num_layers, num_slots, nheads, head_dim, d_state, ngroups=1, max_tokens=6,
                 window=16, state_dtype=torch.float32, act_dtype=torch.bfloat16, device="cpu",
                 strategy="checkpointing", pad_slot_id=-1, base_seed=0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        if state_dtype not in STATE_DTYPES:
            raise TypeError(f"state_dtype: expected one of {[str(d) for d in STATE_DTYPES]}, got {state_dtype}")
        if strategy == "all_states" and is_quantized(state_dtype):
            raise TypeError(f"state_dtype: all_states keeps float states only, got {state_dtype}")
        if ngroups < 1 or nheads % ngroups:
            raise ValueError(f"ngroups: expected a divisor of nheads={nheads}, got {ngroups}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: expected >= 1, got {max_tokens}")
        if strategy == "always_write":
            window = 0
        if not 0 <= window <= MAX_WINDOW:
            raise ValueError(f"window: expected 0 <= window <= {MAX_WINDOW}, got {window}")
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        self.num_layers, self.num_slots, self.strategy = num_layers, num_slots, strategy
        self.H, self.P, self.N, self.G, self.T = nheads, head_dim, d_state, ngroups, max_tokens
        self.W = window
        self.L = max(window, max_tokens) + max_tokens
        self.state_dtype, self.act_dtype = state_dtype, act_dtype
        # processed dt is kept in fp32; float64 only for float64 reference runs
        self.dt_dtype = torch.float64 if act_dtype == torch.float64 else torch.float32
        self.device, self.pad_slot_id = torch.device(device), pad_slot_id
        dev, S, H, P, N, G, L = self.device, num_slots, nheads, head_dim, d_state, ngroups, self.L
        self._ring_start = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self._pnat = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self._seeds = torch.zeros(S + 1, dtype=torch.int64, device=dev)
        self._state_index = torch.zeros(S + 1, dtype=torch.int32, device=dev)
        self.ring_start, self.pnat = self._ring_start[:S], self._pnat[:S]
        self.seeds, self.state_index = self._seeds[:S], self._state_index[:S]
        self.layers = []
        for _ in range(num_layers):
            if strategy == "all_states":
                self.layers.append(LayerCache(
                    torch.zeros(S, max_tokens, H, P, N, dtype=state_dtype, device=dev), None, None, None, None))
                continue
            self.layers.append(LayerCache(
                torch.zeros(S, H, P, N, dtype=state_dtype, device=dev),
                torch.ones(S, H, P, dtype=torch.float32, device=dev) if is_quantized(state_dtype) else None,
                torch.zeros(S, H, L, P, dtype=act_dtype, device=dev),
                torch.zeros(S, G, L, N, dtype=act_dtype, device=dev),
                torch.zeros(S, H, L, dtype=self.dt_dtype, device=dev)))
        self._free = list(range(S))
        # the no-sync path's fault record (specssm/cache/faults.py): raise_if_faulted() reads it
        self.faults = flt.new_record(dev)
        self._generation = 0
        self._base_seed = base_seed

    # ---- slots -------------------------------------------------------------------------------
    def allocate(self, n: int = 1) -> torch.Tensor:
        """Take n free slots and reset them (pnat 0, ring_start 0, fresh seeds, zero state)."""
        if n > len(self._free):
            raise ValueError(f"n: expected at most {len(self._free)} free slots, got {n}")
        slots, self._free = self._free[:n], self._free[n:]
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.reset(idx)
        return idx.to(torch.int32)

    def free(self, slots) -> None:
        """Give slots back; they are reset when allocated again."""
        for s in torch.as_tensor(slots).tolist():
            if not 0 <= s < self.num_slots or s in self._free:
                raise ValueError(f"slots: expected allocated slot ids in [0, {self.num_slots}), got {s}")
            self._free.append(s)

    def reset(self, slots: torch.Tensor) -> None:
        idx = slots.to(self.device, torch.int64)
        self._ring_start[idx] = 0
        self._pnat[idx] = 0
        self._state_index[idx] = 0
        self.fresh_seeds(idx)
        for lc in self.layers:
            lc.state[idx] = 0
            if lc.state_scale is not None:
                lc.state_scale[idx] = 1.0

    def fresh_seeds(self, idx: torch.Tensor) -> None:
        """New Philox seeds for the slots `idx` (int64, on the device), unlike any seed given before: a
        reset, forked or imported slot draws other random bits than the slot it came from."""
        self._generation += 1
        self._seeds[idx] = self._base_seed * 1_000_003 + self._generation * 65_537 + idx

    # ---- moving states: fork, export, import (specssm/cache/transfer.py; materialize: specssm.step) ----
    def fork(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy slots for parallel sampling: every layer's checkpoint, scales and ring rows, and the ring
        position (ring_start, pnat), from `src_slots[i]` to `dst_slots[i]` ((n,) int32/int64, any device;
        a destination of pad_slot_id skips the pair). Destinations are distinct and none is another
        pair's source; each gets a fresh seed, so forks round stochastically with different bits.
        Checked on the host (one sync on a GPU) before anything is written; not for CUDA graphs."""
        transfer.fork(self, src_slots, dst_slots)

    def export_states(self, slots: torch.Tensor) -> dict:
        """The checkpoints of materialized slots (pnat 0: fold a slot's ring first with
        `specssm.step.materialize`), for swap-out or a prefix cache: {"state": (layers, n, H, P, N) in the
        state dtype, "state_scale": (layers, n, H, P) fp32 (int8 / fp8 / int16 states only)}, copies on
        the cache's device. slots: (n,) distinct int32/int64 slot ids, any device. Checked on the host."""
        return transfer.export_states(self, slots)

    def import_states(self, slots: torch.Tensor, tensors: dict) -> None:
        """Write exported states (from any device) to `slots` ((n,) distinct slot ids) as fresh
        checkpoints: pnat 0, ring_start 0, new seeds. Keys, shapes and dtypes must be those
        `export_states` gives for this cache's sizes; checked before anything is written."""
        transfer.import_states(self, slots, tensors)

    def write_state(self, layer: int, slots: torch.Tensor, h: torch.Tensor) -> None:
        """Store prefill states `h (n, H, P, N)` (rounded to nearest) as the checkpoint of `slots`
        (n distinct slot ids), with an empty history. Checked before anything is written."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        check_tensor("slots", slots, ndim=1, dtypes=(torch.int32, torch.int64))
        s = slots.detach().cpu().long()
        bad = (s < 0) | (s >= self.num_slots)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"slots: expected slot ids in [0, {self.num_slots}), got {int(s[i])} at index {i}")
        if s.numel() != torch.unique(s).numel():
            raise ValueError(f"slots: expected distinct slot ids, got {s.tolist()}")
        check_tensor("h", h, shape=(s.numel(), self.H, self.P, self.N), dtypes=FLOAT_ACT_DTYPES,
                     why="one (H, P, N) state per slot")
        lc = self.layers[layer]
        idx = slots.to(self.device, torch.int64)
        q, scale = encode_state(h, self.state_dtype)
        if self.strategy == "all_states":
            lc.state[idx, 0] = q
            self._state_index[idx] = 0
        else:
            lc.state[idx] = q
            if scale is not None:
                lc.state_scale[idx] = scale
        self._pnat[idx] = 0
        self._ring_start[idx] = 0

    def tensors(self) -> list:
        """Every tensor the cache keeps (per-slot arrays with their views, the fault record, every layer's
        state, scales and rings): what a CUDA-graph capture must find at fixed addresses."""
        out = [self._ring_start, self._pnat, self._seeds, self._state_index,
               self.ring_start, self.pnat, self.seeds, self.state_index, self.faults]
        for lc in self.layers:
            out += [t for t in (lc.state, lc.state_scale, lc.x_cache, lc.B_cache, lc.dt_cache) if t is not None]
        return out

    # ---- step ---------------------------------------------------------------------------------
    def op_kwargs(self, layer: int) -> dict:
        """The cache tensors of one layer as keyword arguments of the step op of this strategy."""
        lc = self.layers[layer]
        if self.strategy == "all_states":
            return dict(states=lc.state, state_index=self.state_index)
        kw = dict(state=lc.state, x_cache=lc.x_cache, B_cache=lc.B_cache, dt_cache=lc.dt_cache,
                  ring_start=self.ring_start, prev_num_accepted_tokens=self.pnat, window=self.W,
                  faults=self.faults)
        if lc.state_scale is not None:
            kw["state_scale"] = lc.state_scale
        return kw

    def commit(self, slots: torch.Tensor, accepted: torch.Tensor, num_tokens=None, validate=True):
        """After verification: advance ring_start/pnat (or the all-states index) of the step's rows.

        slots `(batch,)` int (pad rows hold pad_slot_id), accepted `(batch,)` int in [1, len of row],
        num_tokens: None (every row has T tokens) or `(batch,)` per-row lengths (varlen).
        Device tensor ops only; `validate=True` checks the values on the host first (one sync on a
        GPU: pass False inside CUDA graphs). Without validation, a live row whose slot id, length or
        `accepted` breaks the contract is not committed and is recorded in `faults` (`raise_if_faulted`).
        Runs as the custom op `torch.ops.specssm.cache_commit`
        (specssm/library.py), checks included.
        """
        ring = self.strategy != "all_states"
        library.call("cache_commit", slots=slots, accepted=accepted, num_tokens=num_tokens, max_tokens=self.T,
                     window=self.W, ring_len=self.L, num_slots=self.num_slots, pad_slot_id=self.pad_slot_id,
                     validate=validate, seeds=self._seeds, ring_start=self._ring_start if ring else None,
                     pnat=self._pnat if ring else None, state_index=None if ring else self._state_index,
                     faults=self.faults)

    def raise_if_faulted(self) -> None:
        """Raise ValueError naming the first row (of a step, commit or materialize run with validate=False
        since the last call) whose slot id, pnat, ring_start, accepted or k broke the contract, with its
        value, and clear the record. One host sync; call it between steps, outside CUDA-graph capture."""
        flt.raise_if_faulted(self.faults)

    # ---- inspection ---------------------------------------------------------------------------
    def implied_state(self, layer: int, slot: int, A) -> torch.Tensor:
        """The true current state (H, P, N) in float64: checkpoint with its history folded in."""
        lc = self.layers[layer]
        if self.strategy == "all_states":
            return lc.state[slot, int(self.state_index[slot])].to(torch.float64, copy=True)
        S = decode_state(lc.state[slot], None if lc.state_scale is None else lc.state_scale[slot])
        K, rs = int(self.pnat[slot]), int(self.ring_start[slot])
        rows = [(rs + k) % self.L for k in range(K)]
        A_h = A if A.dim() == 1 else A.reshape(A.shape[0], -1)[:, 0]
        return rec.fold(S, lc.x_cache[slot][:, rows].transpose(0, 1),
                        lc.dt_cache[slot][:, rows].transpose(0, 1).double(), A_h,
                        lc.B_cache[slot][:, rows].transpose(0, 1))


def commit_slots(slots, accepted, num_tokens, max_tokens, window, ring_len, num_slots, pad_slot_id, validate,
                 seeds, ring_start, pnat, state_index, faults=None):
    """`SSMCache.commit` on its per-slot arrays of num_slots + 1 entries (the cache_commit op's
    implementation): check the arguments, then advance ring_start / pnat (ring strategies) or
    state_index (all-states) and the seeds of the step's rows. Padding rows land on the extra entry."""
    device = seeds.device
    check_tensor("slots", slots, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    check_tensor("accepted", accepted, shape=tuple(slots.shape), dtypes=(torch.int32, torch.int64), device=device)
    lens = max_tokens if num_tokens is None else num_tokens
    if num_tokens is not None:
        check_tensor("num_tokens", num_tokens, shape=tuple(slots.shape), dtypes=(torch.int32, torch.int64),
                     device=device)
    if validate:
        check_slots_host("slots", slots, num_slots, pad_slot_id)
        a = accepted.detach().cpu().long()
        n = torch.as_tensor(lens).detach().cpu().long().expand_as(a)
        live = slots.detach().cpu() != pad_slot_id
        # a row of more than T tokens would leave pnat > max(W, T): the next step's reads and
        # appends would overlap in the ring
        s = slots.detach().cpu()
        bad = live & ((n < 0) | (n > max_tokens))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"num_tokens: expected row lengths in [0, max_tokens={max_tokens}], got "
                             f"{int(n[i])} at row {i} (slot {int(s[i])})")
        bad = live & ((a < 1) | (a > n))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"accepted: expected values in [1, {int(n[i])}] (tokens of the row), got "
                             f"{int(a[i])} at row {i} (slot {int(s[i])})")
    slot, live, slot_ok = flt.slot_ids(slots, pad_slot_id, num_slots)
    n = torch.as_tensor(lens, device=device).expand_as(accepted)
    acc_ok = (accepted >= 1) & (accepted <= n) & (n <= max_tokens)
    # live rows naming one slot (the step set them aside, or their results raced): none commits
    shared = flt.rows_sharing_a_slot(slot, slot_ok, num_slots)
    if faults is not None:
        flt.record(faults, live & ~slot_ok, flt.SLOT, slots)
        flt.record(faults, slot_ok & ~acc_ok, flt.ACCEPTED, accepted)
        flt.record(faults, shared & acc_ok, flt.DUPLICATE_SLOT, slots)
    # rows that commit nothing (padding, faulted) are redirected to the scratch entry num_slots
    idx = torch.where(slot_ok & acc_ok & ~shared, slot, num_slots)
    acc = accepted.to(torch.int32)
    if state_index is not None:
        state_index[idx] = acc - 1
    else:
        pn, rs = pnat[idx], ring_start[idx]
        flushed = pn + lens > window
        ring_start[idx] = torch.where(flushed, (rs + pn) % ring_len, rs)
        pnat[idx] = torch.where(flushed, acc, pn + acc)
    seeds[idx] = seeds[idx] + 1
