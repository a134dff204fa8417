"""The per-step plan: which rows write their state, in a write-first order, as fixed-size device
buffers, so one CUDA-graph capture of a step serves every later mix of writes.

The plan depends only on per-slot `pnat` and the rows' lengths, so one plan serves all layers of a step.
"""
from __future__ import annotations

from numbers import Integral

import torch

from specssm import library
from specssm._checks import MAX_WINDOW, check_slots_host, check_tensor
from specssm.cache import faults as flt
from specssm.cache.plan_kernel import kernel_runs_on, launch_plan_kernel


class StepPlan:
    """Preallocated plan buffers for up to `max_batch` rows.

    After `build`: `write_flag[b]` (int32 0/1) for rows b < batch; `order[:batch]` lists the rows
    that write, then padding rows, then the rows that do not write, each group in row order (stable);
    `slots[:batch]` the state slot of each entry of `order` (pad_slot_id on padding entries);
    `counts[0]` = rows that write, `counts[1]` = live (non-padding) rows. All on the device.

    Why this layout: the step's write launch finds its j-th row at entry j and the no-write launch at
    entry batch - 1 - j, so neither needs the counts to know where to look, and the slot comes with
    the row: a program reaches its state tile after one round of (parallel) metadata loads.
    """

    def __init__(self, max_batch: int, device="cpu"):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.max_batch, self.device = max_batch, torch.device(device)
        self.write_flag = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.order = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.slots = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        self.counts = torch.zeros(2, dtype=torch.int32, device=self.device)
        self.batch = 0
        self._scratch = None

    @property
    def n_writes(self) -> torch.Tensor:
        return self.counts[0:1]

    def scratch(self, nheads: int, act_dtype: torch.dtype, in_capture_ok: bool = False):
        """The split step's per-(row, head) scratch for up to max_batch rows: the coefficient kernel's
        coefficient tiles (max_batch, nheads, 2, TM, NK) in the activation dtype and fp32 vectors
        (max_batch, nheads, VEC). Allocated at the first split step (and again if nheads or the dtype
        change), never inside a CUDA-graph capture (run one step before capturing), except for a plan
        that lives only inside one call (`in_capture_ok`: the step's own plan when it is given none)."""
        from specssm.step.coef import NK, TM, VEC
        key = (nheads, act_dtype)
        if self._scratch is None or self._scratch[0] != key:
            if self.device.type == "cuda" and not in_capture_ok and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("plan: its split-step scratch is allocated at the first split step; run "
                                   "one step (or plan.scratch(nheads, act_dtype)) before capturing a CUDA graph")
            # NaN-filled once, so a read of a position no kernel wrote shows in the outputs
            nan = float("nan")
            self._scratch = (key, torch.full((self.max_batch, nheads, 2, int(TM), int(NK)), nan, dtype=act_dtype,
                                             device=self.device),
                             torch.full((self.max_batch, nheads, VEC), nan, dtype=torch.float32, device=self.device))
        return self._scratch[1], self._scratch[2]

    def tensors(self) -> list:
        """The plan's buffers and its scratch if allocated: what a CUDA-graph capture must find at fixed
        addresses."""
        return [self.write_flag, self.order, self.slots, self.counts,
                *(self._scratch[1:] if self._scratch is not None else ())]

    def allocated_scratch(self, nheads: int, act_dtype: torch.dtype):
        """The split step's scratch `(coef, vec)` if it is allocated for (nheads, act_dtype), else None.
        Allocates nothing (what a torch.compile trace may call)."""
        if self._scratch is None or self._scratch[0] != (nheads, act_dtype):
            return None
        return self._scratch[1], self._scratch[2]

    @classmethod
    def over(cls, order, slots, counts, batch, coef=None, vec=None) -> StepPlan:
        """A plan around buffers it does not own: the tensors of a built plan as the step op receives them
        (specssm/library.py), its batch, and its split-step scratch `coef`, `vec` (None: the step
        allocates one at its split launches, outside CUDA-graph capture only). Checked here, since a
        caller of the op may pass any tensors: the kernels index them up to the plan's max_batch."""
        check_tensor("plan_order", order, ndim=1, dtype=torch.int32)
        max_batch, device = order.shape[0], order.device
        check_tensor("plan_slots", slots, shape=(max_batch,), dtype=torch.int32, device=device,
                     why="like plan_order")
        check_tensor("plan_counts", counts, shape=(2,), dtype=torch.int32, device=device)
        if not isinstance(batch, Integral) or not 0 <= batch <= max_batch:
            raise ValueError(f"plan_batch: expected an int in [0, {max_batch}] (rows of plan_order), got {batch!r}")
        plan = cls.__new__(cls)
        plan.max_batch, plan.device, plan.batch = max_batch, device, int(batch)
        plan.write_flag, plan.order, plan.slots, plan.counts = None, order, slots, counts
        plan._scratch = None
        if coef is not None or vec is not None:
            from specssm.step.coef import NK, TM, VEC
            check_tensor("plan_coef", coef, ndim=5, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                         device=device)
            nheads = coef.shape[1]
            check_tensor("plan_coef", coef, shape=(max_batch, nheads, 2, int(TM), int(NK)),
                         why="plan.scratch(nheads, act_dtype) of a plan of max_batch rows")
            check_tensor("plan_vec", vec, shape=(max_batch, nheads, VEC), dtype=torch.float32, device=device,
                         why="plan.scratch(nheads, act_dtype) of a plan of max_batch rows")
            for name, t in (("plan_coef", coef), ("plan_vec", vec)):
                if not t.is_contiguous():
                    raise ValueError(f"{name}: expected a contiguous tensor (from plan.scratch), got strides "
                                     f"{tuple(t.stride())}")
            plan._scratch = ((nheads, coef.dtype), coef, vec)
        return plan

    def build(self, pnat, state_batch_indices, window, num_tokens, pad_slot_id=-1, validate=None,
              ring_start=None, ring_len=0, max_pnat=0, faults=None):
        """Fill the buffers for one step. `pnat`: the per-slot `(slots,)` int32/int64 counts;
        `state_batch_indices`: `(batch,)` int32/int64 slot ids, `pad_slot_id` on padding rows;
        `num_tokens`: an int T or a `(batch,)` int32/int64 tensor of row lengths.

        One Triton launch (specssm/cache/plan_kernel.py), no host sync, so it can be captured in a CUDA
        graph; on a CPU without the Triton interpreter the torch reference fills the same buffers.
        Shapes, dtypes, devices and `window` are always checked; slot ids (range, duplicates) are checked
        on the host when `validate` is True, or when it is None (default) and the tensors are on the
        CPU, where that costs no sync (CUDA-graph safe). Runs as the custom op
        `torch.ops.specssm.plan_build` (specssm/library.py), checks included.

        Rows whose slot id lies outside the pool are put with the padding rows (no launch visits them).
        With `ring_start` `(slots,)` int32, `ring_len` (L), `max_pnat` (max(window, T)) and a fault
        record `faults` (specssm/cache/faults.py), so are rows whose pnat or ring_start breaks the
        contract and rows whose slot another live row also has (all of them), and every such row is
        recorded.
        """
        per_row = isinstance(num_tokens, torch.Tensor)
        library.call("plan_build", pnat=pnat, state_batch_indices=state_batch_indices, window=window,
                     num_tokens=0 if per_row else num_tokens, num_tokens_per_row=num_tokens if per_row else None,
                     pad_slot_id=pad_slot_id, validate=validate, write_flag=self.write_flag, order=self.order,
                     slots=self.slots, counts=self.counts, ring_start=ring_start, ring_len=ring_len,
                     max_pnat=max_pnat, faults=faults)
        self.batch = state_batch_indices.shape[0]
        return self

    def build_reference(self, pnat, state_batch_indices, window, num_tokens, pad_slot_id=-1, validate=None,
                        ring_start=None, ring_len=0, max_pnat=0, faults=None):
        """`build` with ~10 small torch ops instead of the Triton kernel (same arguments, checks and
        result); the reference the kernel is tested against."""
        self.batch = fill_plan(pnat, state_batch_indices, window, num_tokens, pad_slot_id, validate,
                               self.write_flag, self.order, self.slots, self.counts, use_kernel=False,
                               ring_start=ring_start, ring_len=ring_len, max_pnat=max_pnat, faults=faults)
        return self


def fill_plan(pnat, state_batch_indices, window, num_tokens, pad_slot_id, validate, write_flag, order, slots,
              counts, use_kernel=True, ring_start=None, ring_len=0, max_pnat=0, faults=None) -> int:
    """Check the arguments of a build, then fill the plan buffers `write_flag`, `order`, `slots`,
    `counts` (the implementation of the plan_build op): with the Triton kernel where it runs and
    `use_kernel`, else with torch ops. With ring_start and the fault record, rows whose pnat or
    ring_start break the contract are set aside and recorded (StepPlan.build). Returns the batch."""
    batch = check_build(pnat, state_batch_indices, window, num_tokens, pad_slot_id, validate, order.shape[0],
                        order.device)
    ring = None
    if ring_start is not None:
        check_tensor("ring_start", ring_start, shape=(pnat.shape[0],), dtypes=(torch.int32, torch.int64),
                     device=order.device)
        check_tensor("faults", faults, shape=(1,), dtype=torch.int64, device=order.device)
        ring = (ring_start, int(ring_len), int(max_pnat), faults)
    if use_kernel and kernel_runs_on(order.device):
        launch_plan_kernel(pnat, state_batch_indices, window, num_tokens, pad_slot_id, write_flag, order, slots,
                           counts, *(ring if ring is not None else ()))
    else:
        _fill_with_torch(pnat, state_batch_indices, window, num_tokens, pad_slot_id, write_flag, order, slots,
                         counts, ring)
    return batch


def check_build(pnat, state_batch_indices, window, num_tokens, pad_slot_id, validate, max_batch, device) -> int:
    """Validate the arguments of a build into buffers of `max_batch` rows on `device` before anything is
    written; returns the batch."""
    check_tensor("state_batch_indices", state_batch_indices, ndim=1,
                 dtypes=(torch.int32, torch.int64), device=device)
    batch = state_batch_indices.shape[0]
    if batch > max_batch:
        raise ValueError(f"state_batch_indices: expected at most max_batch={max_batch} rows, got {batch}")
    check_tensor("pnat", pnat, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if isinstance(num_tokens, torch.Tensor):
        check_tensor("num_tokens", num_tokens, shape=(batch,), dtypes=(torch.int32, torch.int64),
                     device=device)
    elif not isinstance(num_tokens, Integral) or num_tokens < 1:
        raise ValueError(f"num_tokens: expected an int >= 1 or a ({batch},) tensor, got {num_tokens!r}")
    if not isinstance(window, Integral) or not 0 <= window <= MAX_WINDOW:
        raise ValueError(f"window: expected an int in [0, {MAX_WINDOW}], got {window!r}")
    if validate or (validate is None and torch.device(device).type == "cpu"):
        check_slots_host("state_batch_indices", state_batch_indices, pnat.shape[0], pad_slot_id)
    return batch


def _fill_with_torch(pnat, state_batch_indices, window, num_tokens, pad_slot_id, write_flag, order, slots,
                     counts, ring=None):
    batch = state_batch_indices.shape[0]
    if ring is not None:
        ring_start, ring_len, max_pnat, faults = ring
        c = flt.row_checks(state_batch_indices, pnat, ring_start, pad_slot_id, max_pnat, ring_len)
        sbi, live, slot_ok = c["slot"], c["live"], c["slot_ok"]
        pn, rs, pnat_ok, rs_ok, dup = c["pnat"], c["ring_start"], c["pnat_ok"], c["ring_start_ok"], c["shared"]
        for bad, field, value in ((live & ~slot_ok, flt.SLOT, sbi), (slot_ok & ~pnat_ok, flt.PNAT, pn),
                                  (slot_ok & pnat_ok & ~rs_ok, flt.RING_START, rs),
                                  (dup & pnat_ok & rs_ok, flt.DUPLICATE_SLOT, sbi)):
            flt.record(faults, bad, field, value)
        live = slot_ok & pnat_ok & rs_ok & ~dup
    else:
        sbi, _, slot_ok = flt.slot_ids(state_batch_indices, pad_slot_id, pnat.shape[0])
        live = slot_ok      # a slot id outside the pool is never handed to a launch, record or not
    slot = torch.where(slot_ok, sbi, 0)
    write = live & (pnat[slot] + num_tokens > window)
    nowrite = live & ~write
    pad = ~live
    n_w = write.sum(dtype=torch.int32)
    n_live = live.sum(dtype=torch.int32)
    n_pad = batch - n_live
    # rank of each row inside its group, offset by the sizes of the groups before it
    rank = torch.where(write, torch.cumsum(write, 0, dtype=torch.int32) - 1,
                       torch.where(pad, n_w + torch.cumsum(pad, 0, dtype=torch.int32) - 1,
                                   n_w + n_pad + torch.cumsum(nowrite, 0, dtype=torch.int32) - 1))
    rows = torch.arange(batch, dtype=torch.int32, device=order.device)
    order[:batch].scatter_(0, rank.long(), rows)
    slots[:batch].scatter_(0, rank.long(), state_batch_indices.to(torch.int32))
    write_flag[:batch] = write.to(torch.int32)
    counts[0] = n_w
    counts[1] = n_live
