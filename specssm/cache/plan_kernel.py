"""The step plan (docs/design.md, "Kernels": Plan) in one Triton launch.

One program covers the whole batch in a single block of BLOCK = next_power_of_2(batch) rows: it loads
the rows' slots, their pnat and lengths, forms the write / no-write / padding masks, ranks every row
inside its group with prefix sums and scatters the row ids and their slots to their places in `order`
and `slots` (writes, padding, no-writes). Ten small torch kernels become one launch, with no host
sync, so it is captured in a CUDA graph like any other kernel. Inputs are checked by
`StepPlan.build`; this file only launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._runtime import kernels_interpreted

NO_FAULT = tl.constexpr((1 << 63) - 1)     # specssm.cache.faults.NO_FAULT


# batch, the row length, the window and the pad id change between steps; specializing on their values
# (== 1, divisible by 16) would compile a new variant mid-serving, possibly during a graph capture.
@triton.jit(do_not_specialize=["batch", "num_tokens", "window", "pad_slot_id", "max_pnat", "ring_len"])
def _plan_kernel(pnat_ptr, pnat_stride, num_slots, sbi_ptr, sbi_stride, lens_ptr, lens_stride,
                 write_flag_ptr, order_ptr, slots_ptr, counts_ptr, batch, num_tokens, window, pad_slot_id,
                 rs_ptr, rs_stride, ring_len, max_pnat, faults_ptr,
                 VARLEN: tl.constexpr, CHECK_RING: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    in_batch = rows < batch
    slot = tl.load(sbi_ptr + rows * sbi_stride, mask=in_batch, other=pad_slot_id)
    live = in_batch & (slot != pad_slot_id)
    # slot ids are only range-checked on the host when asked; never read outside pnat even so
    slot_ok = live & (slot >= 0) & (slot < num_slots)
    pnat = tl.load(pnat_ptr + slot * pnat_stride, mask=slot_ok, other=0)
    if VARLEN:
        length = tl.load(lens_ptr + rows * lens_stride, mask=in_batch, other=0)
    else:
        length = num_tokens
    if CHECK_RING:
        # a live row whose slot, pnat or ring_start breaks the contract, or whose slot another live row
        # also has, does no work (it joins the padding group, which no launch visits) and leaves a fault
        # in the record (the smallest key)
        rs = tl.load(rs_ptr + slot * rs_stride, mask=slot_ok, other=0)
        pnat_ok = (pnat >= 0) & (pnat <= max_pnat)
        rs_ok = (rs >= 0) & (rs < ring_len)
        field = tl.where(~slot_ok, 1, tl.where(~pnat_ok, 2, 3)).to(tl.int64)
        value = tl.where(~slot_ok | (pnat_ok & rs_ok), slot, tl.where(~pnat_ok, pnat, rs)).to(tl.int64) & 0xFFFFFFFF
        # a slot on two live rows (their steps would race on it): every such row is set aside. Sorting
        # (slot, row) pairs puts them next to each other; the flags go back to row order through
        # write_flag, which is overwritten at the end
        sort_slot = tl.where(slot_ok, slot, num_slots + rows).to(tl.int64)
        pairs = tl.sort((sort_slot << 32) | rows.to(tl.int64))
        pos = tl.arange(0, BLOCK)
        s_sorted = pairs >> 32
        prev = tl.gather(s_sorted, tl.maximum(pos - 1, 0), 0)
        nxt = tl.gather(s_sorted, tl.minimum(pos + 1, BLOCK - 1), 0)
        dup_sorted = ((pos > 0) & (s_sorted == prev)) | ((pos < BLOCK - 1) & (s_sorted == nxt))
        row_sorted = (pairs & 0xFFFFFFFF).to(tl.int32)
        tl.store(write_flag_ptr + row_sorted, dup_sorted.to(tl.int32), mask=row_sorted < batch)
        tl.debug_barrier()
        dup = slot_ok & (tl.load(write_flag_ptr + rows, mask=in_batch, other=0) != 0)
        tl.debug_barrier()
        field = tl.where(dup & pnat_ok & rs_ok, 8, field).to(tl.int64)
        bad = live & (~(slot_ok & pnat_ok & rs_ok) | dup)
        key = tl.where(bad, (rows.to(tl.int64) << 36) | (field << 32) | value, NO_FAULT)
        tl.atomic_min(faults_ptr, tl.min(key, axis=0))
        live = live & ~bad
    else:
        live = slot_ok      # a slot id outside the pool is never handed to a launch, record or not
    write = live & (pnat + length > window)
    stay = live & ~write
    pad = in_batch & ~live

    write_i = write.to(tl.int32)
    stay_i = stay.to(tl.int32)
    pad_i = pad.to(tl.int32)
    n_write = tl.sum(write_i, axis=0)
    n_pad = tl.sum(pad_i, axis=0)
    # inclusive prefix sums give each row its 1-based rank among the earlier rows of its own group,
    # which keeps every group in row order; the groups follow each other write, pad, stay (the step's
    # no-write launch reads the stay group from the end)
    rank = tl.where(write, tl.cumsum(write_i, axis=0) - 1,
                    tl.where(pad, n_write + tl.cumsum(pad_i, axis=0) - 1,
                             n_write + n_pad + tl.cumsum(stay_i, axis=0) - 1))
    n_live = n_write + tl.sum(stay_i, axis=0)
    tl.store(order_ptr + rank, rows, mask=in_batch)
    tl.store(slots_ptr + rank, slot.to(tl.int32), mask=in_batch)
    tl.store(write_flag_ptr + rows, write_i, mask=in_batch)
    tl.store(counts_ptr, n_write)
    tl.store(counts_ptr + 1, n_live)


def kernel_runs_on(device: torch.device) -> bool:
    """CUDA devices, and any device under the interpreter; elsewhere Triton has nothing to launch on."""
    return torch.device(device).type == "cuda" or kernels_interpreted(_plan_kernel)


def _num_warps(block: int) -> int:
    # about 8 rows per thread: the prefix sums stay in registers, small batches use one warp
    return max(1, min(16, block // 256))


def launch_plan_kernel(pnat: torch.Tensor, state_batch_indices: torch.Tensor, window: int, num_tokens,
                       pad_slot_id: int, write_flag: torch.Tensor, order: torch.Tensor, slots: torch.Tensor,
                       counts: torch.Tensor, ring_start=None, ring_len=0, max_pnat=0, faults=None) -> None:
    """Fill `write_flag[:batch]`, `order[:batch]`, `slots[:batch]` and `counts[0:2]` (int32, contiguous)
    in one launch.

    pnat: (slots,) int32/int64; state_batch_indices: (batch,) int32/int64, pad rows hold pad_slot_id;
    num_tokens: int T, or a (batch,) int32/int64 tensor of row lengths. With ring_start (slots,) and the
    fault record `faults` (specssm/cache/faults.py): live rows whose slot, pnat (> max_pnat) or
    ring_start (>= ring_len) breaks the contract are put with the padding rows and recorded.
    Arguments as checked by `StepPlan.build`; 1-D inputs may be strided.
    """
    batch = state_batch_indices.shape[0]
    if batch == 0:
        counts.zero_()
        return
    varlen = isinstance(num_tokens, torch.Tensor)
    lens = num_tokens if varlen else state_batch_indices   # a placeholder pointer when not VARLEN
    block = triton.next_power_of_2(batch)
    check = ring_start is not None
    _plan_kernel[(1,)](
        pnat, pnat.stride(0), pnat.shape[0], state_batch_indices, state_batch_indices.stride(0),
        lens, lens.stride(0), write_flag, order, slots, counts, batch, 0 if varlen else int(num_tokens),
        int(window), int(pad_slot_id), ring_start if check else pnat, ring_start.stride(0) if check else 0,
        int(ring_len), int(max_pnat), faults if check else counts, VARLEN=varlen, CHECK_RING=check, BLOCK=block,
        num_warps=_num_warps(block))
