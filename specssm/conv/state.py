"""The conv1d cache under speculation: allocation, prefill, commit (rollback without copying).

Layout, per layer:

    conv_state  (num_slots, d_conv - 1 + T_max, conv_dim)  activation dtype, token-major
    conv_offset (num_slots,) int32                            per slot, shared by all layers

A decode step of ``T <= T_max`` tokens for slot ``s`` reads the context rows
``[conv_offset[s], conv_offset[s] + d_conv - 1)`` (the ``d_conv - 1`` inputs before the step, oldest
first), computes the outputs, and stores ``[context, T new inputs]`` at rows ``[0, d_conv - 1 + T)``.
So after a step, row ``d_conv - 1 + t`` holds new token ``t`` and the ``d_conv - 1`` inputs ending at
token ``acc - 1`` are rows ``[acc, acc + d_conv - 1)``. The commit after verification is therefore just

    conv_offset[slot] = acc          (1 <= acc <= T)

and a rejected draft costs nothing: no state copy, no second launch, no host sync. ``conv_offset`` is
shared by the layers because every layer of a row accepts the same tokens.

Because the step copies the context it read to rows ``[0, d_conv - 1)``, ``acc = 0`` is also valid:
it discards the whole step (the slot reads exactly the pre-step context again). The one rule: a step
is not idempotent, so between two steps on a slot (all layers of one forward pass = one step) the
slot's offset must be committed (``0`` to abort). Rerunning a step on the old offset would read rows
the first run overwrote.

Why token-major: a step moves whole token rows of a slot (context in, ``[context, new]`` out) and the
conv input ``xBC`` arrives token-major (a column slice of the in_proj output). With token-major rows a
program's load of one token row over a block of channels is one contiguous run
(``conv_dim * itemsize`` bytes per row: 2560 B for conv_dim = 1280 in bf16), so loads and stores are
fully coalesced. A channel-major layout (``(slots, conv_dim, rows)``, the ``causal_conv1d`` one) gives
per-channel runs of only ``d_conv - 1 + T`` elements (~20 B), so each warp access touches one partly used
sector per channel; the byte count is the same, the number of memory transactions is not.
"""

from __future__ import annotations

import torch

__all__ = ["new_conv_state", "new_conv_offset", "conv_commit", "conv_state_from_prefill"]


def new_conv_state(num_slots: int, conv_dim: int, d_conv: int, max_tokens: int, dtype: torch.dtype,
                   device=None) -> torch.Tensor:
    """Zeroed conv state of one layer: (num_slots, d_conv - 1 + max_tokens, conv_dim) of ``dtype``."""
    if not isinstance(d_conv, int) or not 2 <= d_conv <= 4:
        raise ValueError(f"d_conv: got {d_conv!r}, expected an int in [2, 4]")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: got {max_tokens!r}, expected an int >= 1")
    return torch.zeros(num_slots, d_conv - 1 + max_tokens, conv_dim, dtype=dtype, device=device)


def new_conv_offset(num_slots: int, device=None) -> torch.Tensor:
    """Per-slot context offsets (num_slots,) int32, all 0 (context in rows [0, d_conv - 1))."""
    return torch.zeros(num_slots, dtype=torch.int32, device=device)


def _int_vector(name: str, t, length: int | None, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: got {type(t).__name__}, expected a torch.Tensor")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: got dtype {t.dtype}, expected torch.int32 or torch.int64")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "a 1-D tensor"
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {want}")
    if t.device != device:
        raise ValueError(f"{name}: got device {t.device}, expected {device} (the device of conv_offset)")
    return t


def _check_offset(conv_offset) -> None:
    if not isinstance(conv_offset, torch.Tensor):
        raise TypeError(f"conv_offset: got {type(conv_offset).__name__}, expected a torch.Tensor")
    if conv_offset.dtype != torch.int32 or conv_offset.dim() != 1:
        raise TypeError(f"conv_offset: got dtype {conv_offset.dtype} shape {tuple(conv_offset.shape)}, "
                        f"expected a 1-D torch.int32 tensor (num_slots,)")


def conv_commit(conv_offset: torch.Tensor, slots: torch.Tensor | None, accepted: torch.Tensor, *,
                pad_slot_id: int = -1, num_tokens: int | None = None, validate: bool = False) -> None:
    """Commit a verified step: ``conv_offset[slots[i]] = accepted[i]`` for every non-pad row ``i``.

    conv_offset: (num_slots,) int32, updated in place.
    slots:       (batch,) int32/int64 slot of each row (the ``state_batch_indices`` of the step), or
                 None when row ``i`` uses slot ``i``. Rows equal to ``pad_slot_id`` commit nothing.
    accepted:    (batch,) int32/int64 accepted tokens of each row, in ``[1, T]`` (``0`` discards the
                 step: the slot goes back to its pre-step context).

    Device tensor ops only (no ``.item()``, no boolean-mask indexing), so it can sit in a CUDA graph.
    Pad rows are neutralised without host sync by adding a zero delta (``scatter_add_`` of
    ``accepted - old`` for live rows, 0 for pad rows redirected to slot 0), which stays exact when a
    live row of slot 0 shares the target with pad rows; integer adds commute, so it is deterministic.
    Live rows must name distinct slots (as in ``conv1d_update``).
    ``validate=True`` (host sync) checks slots in range and distinct and ``0 <= accepted <= num_tokens``
    (``num_tokens`` = the step's ``T`` if given, else only ``>= 0`` is checked); on CPU tensors these
    checks always run since they are free.
    """
    _check_offset(conv_offset)
    device = conv_offset.device
    num_slots = conv_offset.shape[0]
    accepted = _int_vector("accepted", accepted, None, device)
    batch = accepted.shape[0]
    if slots is None:
        if batch > num_slots:
            raise ValueError(f"accepted: got {batch} rows without slots, expected at most num_slots = "
                             f"{num_slots} (row i commits slot i)")
        slots = torch.arange(batch, device=device)
    slots = _int_vector("slots", slots, batch, device)
    idx = slots.long()
    live = idx != pad_slot_id
    if validate or device.type == "cpu":
        if bool(((idx < 0) | (idx >= num_slots))[live].any()):
            raise ValueError(f"slots: got {idx[live & ((idx < 0) | (idx >= num_slots))].tolist()[:8]}, "
                             f"expected ids in [0, {num_slots}) or pad_slot_id = {pad_slot_id}")
        acc_live = accepted[live]
        hi = num_tokens
        bad = (acc_live < 0) if hi is None else ((acc_live < 0) | (acc_live > hi))
        if bool(bad.any()):
            want = f"[0, {hi}]" if hi is not None else ">= 0"
            raise ValueError(f"accepted: got {acc_live[bad].tolist()[:8]}, expected values in {want}")
        if bool(idx[live].unique().numel() != idx[live].numel()):
            raise ValueError(f"slots: got duplicate live slot ids {idx[live].tolist()[:16]}, "
                             f"expected each slot at most once")
    safe = torch.where(live, idx, torch.zeros_like(idx))
    delta = torch.where(live, accepted.to(torch.int32) - conv_offset[safe], torch.zeros_like(conv_offset[safe]))
    conv_offset.scatter_add_(0, safe, delta)


def conv_state_from_prefill(conv_state: torch.Tensor, conv_offset: torch.Tensor, slots: torch.Tensor,
                            xBC: torch.Tensor, d_conv: int, seq_lens: torch.Tensor | None = None) -> None:
    """Initialise slots from prefill: context = last ``d_conv - 1`` conv inputs of each prompt.

    conv_state:  (num_slots, d_conv - 1 + T_max, conv_dim) one layer's conv state (updated in place).
    conv_offset: (num_slots,) int32; set to 0 for ``slots`` (shared by layers, so calling this once per
                 layer is harmless).
    slots:       (batch,) int32/int64 distinct valid slot ids (no pad rows here).
    xBC:         (batch, L, conv_dim) right-padded conv inputs of the prompts (before the conv).
    d_conv:      kernel width (2..4).
    seq_lens:    (batch,) int32/int64 prompt lengths in ``[0, L]``, or None for all ``L``.

    Prompts shorter than ``d_conv - 1`` get zeros in front (the causal conv's zero padding), which is
    exactly what a fresh sequence sees. Device tensor ops only (gather + index_put), no host sync.
    """
    if not isinstance(d_conv, int) or not 2 <= d_conv <= 4:
        raise ValueError(f"d_conv: got {d_conv!r}, expected an int in [2, 4]")
    _check_offset(conv_offset)
    device = conv_offset.device
    if not isinstance(conv_state, torch.Tensor) or conv_state.dim() != 3:
        raise ValueError(f"conv_state: got {getattr(conv_state, 'shape', type(conv_state).__name__)}, "
                         f"expected a (num_slots, d_conv - 1 + T_max, conv_dim) tensor")
    num_slots, rows, conv_dim = conv_state.shape
    if rows < d_conv:
        raise ValueError(f"conv_state: got {rows} rows per slot, expected >= d_conv = {d_conv} "
                         f"(d_conv - 1 context rows + at least 1 token)")
    if conv_offset.shape[0] != num_slots:
        raise ValueError(f"conv_offset: got shape {tuple(conv_offset.shape)}, expected ({num_slots},)")
    if conv_state.device != device:
        raise ValueError(f"conv_state: got device {conv_state.device}, expected {device}")
    if not isinstance(xBC, torch.Tensor) or xBC.dim() != 3 or xBC.shape[2] != conv_dim:
        raise ValueError(f"xBC: got {getattr(xBC, 'shape', type(xBC).__name__)}, "
                         f"expected (batch, L, {conv_dim})")
    if xBC.device != device:
        raise ValueError(f"xBC: got device {xBC.device}, expected {device}")
    batch, L, _ = xBC.shape
    slots = _int_vector("slots", slots, batch, device)
    if seq_lens is None:
        seq_lens = torch.full((batch,), L, dtype=torch.int64, device=device)
    seq_lens = _int_vector("seq_lens", seq_lens, batch, device)
    if device.type == "cpu":
        if bool(((slots < 0) | (slots >= num_slots)).any()):
            raise ValueError(f"slots: got {slots.tolist()[:8]}, expected ids in [0, {num_slots})")
        if bool(((seq_lens < 0) | (seq_lens > L)).any()):
            raise ValueError(f"seq_lens: got {seq_lens.tolist()[:8]}, expected values in [0, {L}]")
    ctx = d_conv - 1
    pos = seq_lens.long()[:, None] - ctx + torch.arange(ctx, device=device)  # (batch, ctx)
    inside = pos >= 0
    if L > 0:
        index = pos.clamp(0, L - 1)[:, :, None].expand(batch, ctx, conv_dim)
        context = torch.gather(xBC, 1, index)
        context = torch.where(inside[:, :, None], context, torch.zeros_like(context))
    else:
        context = xBC.new_zeros(batch, ctx, conv_dim)
    conv_state[slots.long(), :ctx] = context.to(conv_state.dtype)
    conv_offset[slots.long()] = 0
