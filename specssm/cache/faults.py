"""The device-side fault record of the no-sync path (validate=False).

Kernels and the commit never read or write outside the caches whatever a row's slot, pnat,
ring_start or accepted value is: a live row with a value outside the contract does no work and
records a fault. The record is one int64 on the device holding the smallest key

    key = row << 36 | field << 32 | (value mod 2**32)

over all faults since it was last cleared (an atomic min, no host sync), so it names the first faulted
row, the field and its value. `raise_if_faulted` reads it (one sync, outside CUDA graphs).
"""
from __future__ import annotations

import torch

NO_FAULT = (1 << 63) - 1
# field codes: the argument a faulted value came from, what the contract expects
FIELDS = {1: ("state_batch_indices", "a slot id in [0, num_slots) or pad_slot_id"),
          2: ("prev_num_accepted_tokens", "pnat in [0, max(window, T)]"),
          3: ("ring_start", "ring_start in [0, L)"),
          4: ("accepted", "accepted in [1, tokens of the row]"),
          # materialize: the row is the pair's index
          5: ("src_slots", "a slot id in [0, num_slots)"),
          6: ("dst_slots", "a slot id in [0, num_slots) or pad_slot_id, no other pair's source or destination"),
          7: ("k", "k in [0, pnat of the source slot]"),
          8: ("state_batch_indices", "each slot id on one row of a step (the value is the slot)")}
SLOT, PNAT, RING_START, ACCEPTED = 1, 2, 3, 4
SRC, DST, K = 5, 6, 7
DUPLICATE_SLOT = 8


def new_record(device) -> torch.Tensor:
    return torch.full((1,), NO_FAULT, dtype=torch.int64, device=device)


def fault_keys(rows: torch.Tensor, field: int, values: torch.Tensor) -> torch.Tensor:
    """The record keys of (row, field, value) triples (int64 tensors), as the kernels encode them."""
    return (rows.long() << 36) | (field << 32) | (values.long() & 0xFFFFFFFF)


def rows_sharing_a_slot(slots: torch.Tensor, ok: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(batch,) bool: the rows in `ok` whose slot id (in [0, num_slots) where ok) another row in `ok`
    names too. Device ops only (no host sync): rows outside `ok` count on a scratch entry."""
    idx = torch.where(ok, slots.long(), num_slots)
    rows_on_slot = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    rows_on_slot.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
    return ok & (rows_on_slot[idx] > 1)


def slot_ids(slots: torch.Tensor, pad_slot_id: int, num_slots: int) -> tuple:
    """(slot ids as int64, live: not padding, slot_ok: a live row's id in [0, num_slots))."""
    slot = slots.long()
    live = slot != pad_slot_id
    return slot, live, live & (slot >= 0) & (slot < num_slots)


def row_checks(slots: torch.Tensor, pnat: torch.Tensor, ring_start: torch.Tensor, pad_slot_id: int,
               max_pnat: int, ring_len: int) -> dict:
    """What a step checks of each row, with device ops only: "live" (not padding), "slot_ok" (a live
    row's slot id in the pool), "pnat_ok" / "ring_start_ok" (its slot's values in the contract), "shared"
    (another such row names the slot), the slots' "pnat" / "ring_start" (0-filled where the slot id is
    not in the pool) and the slot ids as int64 ("slot"). pnat / ring_start are per-slot arrays with a
    scratch entry after the pool (SSMCache's _pnat / _ring_start) or without one."""
    num_slots = pnat.shape[0]
    slot, live, slot_ok = slot_ids(slots, pad_slot_id, num_slots)
    idx = torch.where(slot_ok, slot, 0)
    pn = torch.where(slot_ok, pnat[idx], 0).long()
    rs = torch.where(slot_ok, ring_start[idx], 0).long()
    pnat_ok = (pn >= 0) & (pn <= max_pnat)
    rs_ok = (rs >= 0) & (rs < ring_len)
    shared = rows_sharing_a_slot(slot, slot_ok, num_slots)
    return dict(live=live, slot_ok=slot_ok, pnat_ok=pnat_ok, ring_start_ok=rs_ok, shared=shared, pnat=pn,
                ring_start=rs, slot=slot)


def set_aside(slots: torch.Tensor, pnat: torch.Tensor, ring_start: torch.Tensor, pad_slot_id: int,
              max_pnat: int, ring_len: int) -> torch.Tensor:
    """`slots` with pad_slot_id on every row the step sets aside (a slot id, pnat or ring_start outside
    the contract, or a slot another row names): what the ops beside the step (the conv update) take so
    that a faulted row does no work anywhere. Device ops only; records nothing (the step does)."""
    c = row_checks(slots, pnat, ring_start, pad_slot_id, max_pnat, ring_len)
    ok = c["slot_ok"] & c["pnat_ok"] & c["ring_start_ok"] & ~c["shared"]
    return torch.where(ok, slots, torch.full_like(slots, pad_slot_id))


def record(faults: torch.Tensor, bad: torch.Tensor, field: int, values: torch.Tensor) -> None:
    """Fold the faults of the rows flagged in `bad` into the record with device ops only."""
    if bad.numel() == 0:
        return
    rows = torch.arange(bad.shape[0], device=bad.device)
    keys = torch.where(bad, fault_keys(rows, field, values), NO_FAULT)
    torch.minimum(faults, keys.amin().reshape(1), out=faults)


def decode(key: int) -> tuple[int, int, int]:
    """(row, field, value) of a record key."""
    value = key & 0xFFFFFFFF
    return key >> 36, (key >> 32) & 0xF, value - (1 << 32) if value >= 1 << 31 else value


def raise_if_faulted(faults: torch.Tensor) -> None:
    """Raise ValueError naming the first faulted row, its field and value, and clear the record; one
    host sync. Outside CUDA-graph capture only."""
    key = int(faults.item())
    if key == NO_FAULT:
        return
    faults.fill_(NO_FAULT)
    row, field, value = decode(key)
    name, expected = FIELDS.get(field, (f"field {field}", "?"))
    raise ValueError(f"{name}: row {row} of a step, commit or materialize run without validation had {value}, "
                     f"expected {expected}; the row did no work (its outputs and its slot were left as they were)")
