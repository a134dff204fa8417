"""Mamba2 depthwise causal conv1d decode update for speculative decoding (Triton).

One launch computes the conv outputs of the ``T`` tokens of every row of a verify step and stores the
slot's ``[context, T new inputs]`` rows so that any acceptance ``1 <= acc <= T`` is committed by
``conv_offset[slot] = acc`` (see ``state.py`` for the cache contract and the layout rationale).

Program = (row, block of channels). It loads everything it needs (context, new inputs, taps), then a
block barrier, then stores: the rows it stores overlap the rows it read, and with ``out`` allowed to
alias ``xBC`` the same holds for the outputs, while different threads of the block hold the loaded and
the stored elements. Programs never share memory: each row owns one slot (live rows must name
distinct slots) and each program a disjoint block of channels.

With ``pdl=True`` (sm_90+) every program first signals ``griddepcontrol.launch_dependents``: the next
kernel of the stream, the SSM step launched with Programmatic Dependent Launch, may then start while
the conv runs, load its state tile (which the conv does not touch) and wait (``gdc_wait``) only
before it reads the conv's outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from specssm import library
from specssm._checks import CPU_FIX, check_slots_host
from specssm._runtime import kernels_interpreted
from specssm._runtime import pdl_supported as _pdl_supported

__all__ = ["conv1d_update"]

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ACTIVATIONS = (None, "silu", "swish")


# ----------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _conv1d_update_kernel(
    xbc_ptr, state_ptr, offset_ptr, weight_ptr, bias_ptr, out_ptr, slot_idx_ptr,
    conv_dim, pad_slot_id, num_slots, max_offset,
    stride_x_row, stride_x_tok, stride_x_ch,
    stride_s_slot, stride_s_row, stride_s_ch,
    stride_w_ch, stride_w_tap,
    stride_o_row, stride_o_tok, stride_o_ch,
    T: tl.constexpr, D_CONV: tl.constexpr, T_PAD: tl.constexpr, CTX_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SLOT_IDX: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        # First thing: the dependent step may be scheduled as soon as every program got here, so its
        # state load overlaps this kernel (it waits for our completion before reading our outputs).
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    ch_block = tl.program_id(1)

    if HAS_SLOT_IDX:
        slot = tl.load(slot_idx_ptr + row).to(tl.int64)
    else:
        slot = row
    # A pad row keeps every access masked off; slot 0 only keeps the (never dereferenced) pointers sane.
    # So does a slot id outside the pool or a read offset past the slot's rows (validate=False: the
    # step's plan records such rows; here they only must not touch memory outside their slot).
    live = (slot != pad_slot_id) & (slot >= 0) & (slot < num_slots)
    slot = tl.where(live, slot, 0)
    offset = tl.load(offset_ptr + slot, mask=live, other=0).to(tl.int64)
    live = live & (offset >= 0) & (offset <= max_offset)

    ch = ch_block * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = (ch < conv_dim) & live
    ch2 = ch[None, :]
    ch_ok2 = ch_ok[None, :]
    tok = tl.arange(0, T_PAD)[:, None]            # token of the step (rows of the output tile)
    tok_ok = (tok < T) & ch_ok2
    ctx = tl.arange(0, CTX_PAD)[:, None]          # context row, oldest first
    ctx_ok = (ctx < D_CONV - 1) & ch_ok2

    x_row = xbc_ptr + row * stride_x_row
    s_slot = state_ptr + slot * stride_s_slot

    # ---- loads (all of them before any store) ----
    context = tl.load(s_slot + (offset + ctx) * stride_s_row + ch2 * stride_s_ch, mask=ctx_ok, other=0.0)
    new_x = tl.load(x_row + tok * stride_x_tok + ch2 * stride_x_ch, mask=tok_ok, other=0.0)

    acc = tl.zeros((T_PAD, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=ch_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(D_CONV):
        w_k = tl.load(weight_ptr + ch * stride_w_ch + k * stride_w_tap, mask=ch_ok, other=0.0)
        # Tap k of token t reads input t + k - (D_CONV - 1): a new token when >= 0, else a context row.
        # These reloads of rows already in `context` / `new_x` hit L1; shifting register tiles across
        # threads would cost more than the cached loads.
        src = tok + (k - (D_CONV - 1))
        from_new = tl.load(x_row + tl.maximum(src, 0) * stride_x_tok + ch2 * stride_x_ch,
                           mask=tok_ok & (src >= 0), other=0.0)
        from_ctx = tl.load(s_slot + (offset + (D_CONV - 1) + tl.minimum(src, -1)) * stride_s_row
                           + ch2 * stride_s_ch, mask=tok_ok & (src < 0), other=0.0)
        tap = tl.where(src >= 0, from_new.to(tl.float32), from_ctx.to(tl.float32))
        acc += w_k.to(tl.float32)[None, :] * tap
    if SILU:
        acc = acc * tl.sigmoid(acc)

    tl.debug_barrier()

    # ---- stores ----
    tl.store(out_ptr + row * stride_o_row + tok * stride_o_tok + ch2 * stride_o_ch,
             acc.to(out_ptr.dtype.element_ty), mask=tok_ok)
    tl.store(s_slot + ctx * stride_s_row + ch2 * stride_s_ch, context, mask=ctx_ok)
    tl.store(s_slot + ((D_CONV - 1) + tok) * stride_s_row + ch2 * stride_s_ch,
             new_x.to(state_ptr.dtype.element_ty), mask=tok_ok)


# ----------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------
def _tensor(name, t, expected):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: got {type(t).__name__}, expected {expected}")
    return t


def _same_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name}: got device {t.device}, expected {device} (the device of xBC)")


def _check_inputs(xBC, conv_state, conv_offset, weight, bias, activation, state_batch_indices,
                  pad_slot_id, out, validate):
    """Validate everything before touching memory; returns (weight as 2-D view, d_conv)."""
    _tensor("xBC", xBC, "a (batch, T, conv_dim) torch.Tensor")
    if xBC.dim() != 3:
        raise ValueError(f"xBC: got shape {tuple(xBC.shape)}, expected (batch, T, conv_dim)")
    if xBC.dtype not in _ACT_DTYPES:
        raise TypeError(f"xBC: got dtype {xBC.dtype}, expected one of {_ACT_DTYPES}")
    batch, T, conv_dim = xBC.shape
    if T < 1:
        raise ValueError(f"xBC: got T = {T} tokens per row, expected T >= 1")
    device = xBC.device
    if device.type != "cuda" and not kernels_interpreted(_conv1d_update_kernel):
        raise ValueError(f"xBC: got device {device}, expected a CUDA device, or the CPU under the Triton "
                         f"interpreter (off when this kernel was imported). Fix: {CPU_FIX}")

    _tensor("weight", weight, "a (conv_dim, d_conv) torch.Tensor")
    if weight.dim() == 3 and weight.shape[1] == 1:  # nn.Conv1d(groups=conv_dim).weight
        weight = weight[:, 0, :]
    if weight.dim() != 2 or weight.shape[0] != conv_dim or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight: got shape {tuple(weight.shape)}, expected ({conv_dim}, d_conv) with "
                         f"d_conv in [2, 4] (conv_dim from xBC)")
    if weight.dtype not in _ACT_DTYPES:
        raise TypeError(f"weight: got dtype {weight.dtype}, expected one of {_ACT_DTYPES}")
    _same_device("weight", weight, device)
    d_conv = weight.shape[1]

    if bias is not None:
        _tensor("bias", bias, "None or a (conv_dim,) torch.Tensor")
        if bias.dim() != 1 or bias.shape[0] != conv_dim:
            raise ValueError(f"bias: got shape {tuple(bias.shape)}, expected ({conv_dim},)")
        if bias.dtype not in _ACT_DTYPES:
            raise TypeError(f"bias: got dtype {bias.dtype}, expected one of {_ACT_DTYPES}")
        _same_device("bias", bias, device)

    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: got {activation!r}, expected one of {_ACTIVATIONS}")

    _tensor("conv_state", conv_state, "a (num_slots, d_conv - 1 + T_max, conv_dim) torch.Tensor")
    if conv_state.dim() != 3 or conv_state.shape[2] != conv_dim:
        raise ValueError(f"conv_state: got shape {tuple(conv_state.shape)}, "
                         f"expected (num_slots, d_conv - 1 + T_max, {conv_dim})")
    if conv_state.dtype != xBC.dtype:
        raise TypeError(f"conv_state: got dtype {conv_state.dtype}, expected {xBC.dtype} (the dtype of xBC)")
    _same_device("conv_state", conv_state, device)
    num_slots, rows, _ = conv_state.shape
    if d_conv - 1 + T > rows:
        raise ValueError(f"xBC: got T = {T} tokens per row, expected T <= T_max = {rows - (d_conv - 1)} "
                         f"(conv_state holds {rows} rows per slot = d_conv - 1 + T_max with d_conv = {d_conv})")

    _tensor("conv_offset", conv_offset, "a (num_slots,) int32 torch.Tensor")
    if conv_offset.dtype != torch.int32:
        raise TypeError(f"conv_offset: got dtype {conv_offset.dtype}, expected torch.int32")
    if conv_offset.dim() != 1 or conv_offset.shape[0] != num_slots:
        raise ValueError(f"conv_offset: got shape {tuple(conv_offset.shape)}, expected ({num_slots},)")
    _same_device("conv_offset", conv_offset, device)

    if not isinstance(pad_slot_id, int) or isinstance(pad_slot_id, bool):
        raise TypeError(f"pad_slot_id: got {pad_slot_id!r}, expected an int")
    if state_batch_indices is None:
        if batch > num_slots:
            raise ValueError(f"xBC: got batch = {batch} rows and no state_batch_indices, expected "
                             f"batch <= num_slots = {num_slots} (row i uses slot i)")
    else:
        _tensor("state_batch_indices", state_batch_indices, "None or a (batch,) int torch.Tensor")
        if state_batch_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"state_batch_indices: got dtype {state_batch_indices.dtype}, "
                            f"expected torch.int32 or torch.int64")
        if state_batch_indices.dim() != 1 or state_batch_indices.shape[0] != batch:
            raise ValueError(f"state_batch_indices: got shape {tuple(state_batch_indices.shape)}, "
                             f"expected ({batch},)")
        _same_device("state_batch_indices", state_batch_indices, device)

    if out is not None:
        _tensor("out", out, "None or a (batch, T, conv_dim) torch.Tensor")
        if tuple(out.shape) != tuple(xBC.shape):
            raise ValueError(f"out: got shape {tuple(out.shape)}, expected {tuple(xBC.shape)} (the shape of xBC)")
        if out.dtype != xBC.dtype:
            raise TypeError(f"out: got dtype {out.dtype}, expected {xBC.dtype} (the dtype of xBC)")
        _same_device("out", out, device)
        if _shares_storage(out, conv_state):
            raise ValueError("out: got a tensor sharing memory with conv_state, expected separate memory")
    if _shares_storage(xBC, conv_state):
        raise ValueError("xBC: got a tensor sharing memory with conv_state, expected separate memory")

    # Value checks need the data on the host: free on CPU, a sync on GPU (opt in with validate=True).
    if validate or device.type == "cpu":
        if state_batch_indices is None:
            slots = torch.arange(batch, device=device)
        else:
            # in range or pad, and distinct (two rows on one slot would race on its state)
            check_slots_host("state_batch_indices", state_batch_indices, num_slots, pad_slot_id)
            slots = state_batch_indices.long()
        live = slots[slots != pad_slot_id]
        if live.numel():
            offs = conv_offset.long()[live]
            bad = offs[(offs < 0) | (offs > rows - (d_conv - 1))]
            if bad.numel():
                raise ValueError(f"conv_offset: got offsets {bad.tolist()[:8]} for slots of this step, "
                                 f"expected values in [0, {rows - (d_conv - 1)}] (= T_max)")
    return weight, d_conv


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _launch(xBC, conv_state, conv_offset, weight, bias, silu, state_batch_indices, pad_slot_id, out,
            pdl=False, block_c=None):
    batch, T, conv_dim = xBC.shape
    d_conv = weight.shape[1]
    if block_c is None:
        # Untuned default: 128 channels x T tokens per program (10 blocks per row at conv_dim = 1280).
        block_c = min(128, max(16, triton.next_power_of_2(conv_dim)))
    t_pad = triton.next_power_of_2(T)
    # ~8 elements per thread (16-byte vectors in bf16/fp16), no replicated lanes.
    num_warps = max(1, min(8, t_pad * block_c // 256))
    grid = (batch, triton.cdiv(conv_dim, block_c))
    has_idx = state_batch_indices is not None
    _conv1d_update_kernel[grid](
        xBC, conv_state, conv_offset, weight, bias if bias is not None else weight, out,
        state_batch_indices if has_idx else conv_offset,
        conv_dim, pad_slot_id, conv_state.shape[0], conv_state.shape[1] - (d_conv - 1),
        xBC.stride(0), xBC.stride(1), xBC.stride(2),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        T=T, D_CONV=d_conv, T_PAD=t_pad, CTX_PAD=triton.next_power_of_2(d_conv - 1),
        HAS_BIAS=bias is not None, HAS_SLOT_IDX=has_idx, SILU=silu, BLOCK_C=block_c,
        PDL=pdl and _pdl_supported(xBC.device), num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------
def conv1d_update(xBC: torch.Tensor, conv_state: torch.Tensor, conv_offset: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = "silu",
                  state_batch_indices: torch.Tensor | None = None, pad_slot_id: int = -1,
                  out: torch.Tensor | None = None, *, validate: bool = False, pdl: bool = False) -> torch.Tensor:
    """Causal depthwise conv1d over the ``T`` new tokens of each row, with rollback-free conv state.

    Args:
        xBC: (batch, T, conv_dim) conv inputs of the step, bf16/fp16/fp32. Any strides (a column slice
            of the in_proj output is fine); contiguous channels give coalesced loads.
        conv_state: (num_slots, d_conv - 1 + T_max, conv_dim), same dtype as ``xBC``; one layer's
            cache. Requires ``T <= T_max``. Updated in place: for every live row, its slot's rows
            ``[0, d_conv - 1 + T)`` become ``[context, xBC[row]]``; other rows are not touched.
        conv_offset: (num_slots,) int32, shared by layers; the context of slot ``s`` is rows
            ``[conv_offset[s], conv_offset[s] + d_conv - 1)``. Read only; commit with
            ``conv_commit(conv_offset, slots, accepted)`` after verification.
        weight: (conv_dim, d_conv) with ``2 <= d_conv <= 4`` (a (conv_dim, 1, d_conv) Conv1d weight is
            accepted too), bf16/fp16/fp32. bias: (conv_dim,) or None.
        activation: "silu" (= "swish", default) or None.
        state_batch_indices: (batch,) int32/int64 slot of each row, or None for slot = row. Live rows
            must name distinct slots.
        pad_slot_id: rows whose index equals it read and write nothing: neither the state, nor their
            rows of ``out`` (left as they were; with ``out=None`` those rows are uninitialised).
        out: optional (batch, T, conv_dim) output in ``xBC.dtype``; may be ``xBC`` itself (in place).
        validate: also run the value checks that need a host sync on GPU (slot ids in range and
            distinct, offsets in ``[0, T_max]``). On CPU (interpreter) they always run.
        pdl: Programmatic Dependent Launch towards the next kernel (sm_90+; ignored elsewhere and in
            the interpreter). The kernel lets its dependent start at once, so a step op launched next
            with PDL (``checkpointing_ssu(..., pdl=True)``) loads its state, which does not depend on
            the conv, while the conv finishes, and waits for the conv only before reading x/B/C. The
            conv itself is launched normally: its producer (in_proj) must have finished. Outputs and
            state are the same as with ``pdl=False``.

    Returns:
        ``out`` (batch, T, conv_dim) in ``xBC.dtype``: ``act(bias + sum_k weight[:, k] * u[t + k - d_conv
        + 1])`` accumulated in fp32, ``u`` = context followed by the new tokens.

    Raises ValueError/TypeError naming the argument before anything is written. Runs as the custom op
    ``torch.ops.specssm.conv1d_update`` (specssm/library.py), checks included; ``out=None`` is
    allocated here, before the op.
    """
    if out is None and isinstance(xBC, torch.Tensor):
        out = torch.empty(xBC.shape, dtype=xBC.dtype, device=xBC.device)
    library.call("conv1d_update", xBC=xBC, conv_state=conv_state, conv_offset=conv_offset, weight=weight, bias=bias,
                 activation=activation, state_batch_indices=state_batch_indices, pad_slot_id=pad_slot_id, out=out,
                 validate=validate, pdl=pdl)
    return out


def _conv1d_update(xBC, conv_state, conv_offset, weight, bias, activation, state_batch_indices, pad_slot_id, out,
                   validate, pdl):
    """The conv1d_update op's implementation: check everything, then launch into ``out``."""
    weight, d_conv = _check_inputs(xBC, conv_state, conv_offset, weight, bias, activation,
                                   state_batch_indices, pad_slot_id, out, validate)
    if out is None:
        out = torch.empty(xBC.shape, dtype=xBC.dtype, device=xBC.device)
    if xBC.shape[0] == 0:
        return out
    return _launch(xBC, conv_state, conv_offset, weight, bias, activation is not None,
                   state_batch_indices, pad_slot_id, out, pdl)
