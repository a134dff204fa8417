"""The two strategies checkpointing replay is measured against, on the same API family.

always-write replay: the state holds the checkpoint one step back and the ring the previous step's
inputs; every row folds its accepted tokens in and writes the state, every step (the checkpointing
kernel compiled for its write branch, window 0). all-states: every row writes all T intermediate
states; the commit selects the accepted one by index (no copy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm import library
from specssm._checks import check_all_states_args, check_kernel_layout
from specssm.step.device import silu, softplus

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)     # of states and activations
ALL_STATES_BLOCK_P = 64     # state rows per all-states program (4 warps)


def always_write_ssu(state, x_cache, B_cache, dt_cache, ring_start, prev_num_accepted_tokens, x, dt, A,
                     B, C, out, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None,
                     pad_slot_id=-1, state_scale=None, rand_seed=None, philox_rounds=10, cu_seqlens=None,
                     max_seqlen=None, window=0, rounding="rn", no_write_form="rectangle", plan=None,
                     launch="always_write", precision="fast", validate=True, faults=None):
    """Always-write replay (Triton): `checkpointing_ssu` with window 0, every row writes its state.
    Use with `SSMCache(strategy="always_write")` (ring of 2T rows). Same shapes as checkpointing_ssu;
    `plan` and `launch` are ignored (every row writes). Runs as `torch.ops.specssm.always_write_ssu`."""
    if window not in (0, None):
        raise ValueError(f"window: always-write replay writes every step (window 0), got {window}")
    library.call(
        "always_write_ssu", state=state, x_cache=x_cache, B_cache=B_cache, dt_cache=dt_cache,
        ring_start=ring_start, prev_num_accepted_tokens=prev_num_accepted_tokens, x=x, dt=dt, A=A, B=B, C=C,
        out=out, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices,
        pad_slot_id=pad_slot_id, state_scale=state_scale, rand_seed=rand_seed, philox_rounds=philox_rounds,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, rounding=rounding, no_write_form=no_write_form,
        precision=precision, validate=validate, faults=faults)
    return out


@triton.jit
def _all_states_kernel(
    states_ptr, index_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, out_ptr, D_ptr, z_ptr, dt_bias_ptr, sbi_ptr,
    T, pad_slot_id, H, P, N, HPG, NPT,
    s_st_s, s_st_t, s_st_h, s_st_p, s_x_b, s_x_t, s_x_h, s_dt_b, s_dt_t, s_dt_h, s_B_b, s_B_t, s_B_g,
    s_o_b, s_o_t, s_o_h, s_z_b, s_z_t, s_z_h,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SBI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    row = item // (H * NPT)
    h = (item % (H * NPT)) // NPT
    pt = item % NPT
    if HAS_SBI:
        slot = tl.load(sbi_ptr + row).to(tl.int64)
    else:
        slot = row.to(tl.int64)
    if slot != pad_slot_id:
        g = h // HPG
        offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        p_ok = offs_p < P
        n_ok = offs_n < N
        mask = p_ok[:, None] & n_ok[None, :]
        tile = h * s_st_h + offs_p[:, None] * s_st_p + offs_n[None, :]
        cur = tl.load(index_ptr + slot)
        hs = tl.load(states_ptr + slot * s_st_s + cur * s_st_t + tile, mask=mask, other=0.0).to(tl.float32)
        A = tl.load(A_ptr + h).to(tl.float32)
        for t in range(T):
            dt = tl.load(dt_ptr + row * s_dt_b + t * s_dt_t + h * s_dt_h).to(tl.float32)
            if HAS_BIAS:
                dt += tl.load(dt_bias_ptr + h).to(tl.float32)
            if SOFTPLUS:
                dt = softplus(dt)
            xt = tl.load(x_ptr + row * s_x_b + t * s_x_t + h * s_x_h + offs_p, mask=p_ok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + row * s_B_b + t * s_B_t + g * s_B_g + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + row * s_B_b + t * s_B_t + g * s_B_g + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            hs = tl.exp(A * dt) * hs + (dt * xt)[:, None] * Bt[None, :]
            tl.store(states_ptr + slot * s_st_s + t * s_st_t + tile, hs.to(states_ptr.dtype.element_ty), mask=mask)
            y = tl.sum(hs * Ct[None, :], axis=1)
            if HAS_D:
                y += tl.load(D_ptr + h).to(tl.float32) * xt
            if HAS_Z:
                zt = tl.load(z_ptr + row * s_z_b + t * s_z_t + h * s_z_h + offs_p, mask=p_ok, other=0.0).to(tl.float32)
                y = y * silu(zt)
            tl.store(out_ptr + row * s_o_b + t * s_o_t + h * s_o_h + offs_p, y.to(out_ptr.dtype.element_ty), mask=p_ok)


def all_states_ssu(states, state_index, x, dt, A, B, C, out, D=None, z=None, dt_bias=None,
                   dt_softplus=False, state_batch_indices=None, pad_slot_id=-1, validate=True):
    """All-states (Triton): read states[s, state_index[s]], write all T intermediate states.

    states (slots, T, H, P, N) fp32/bf16/fp16; state_index (slots,) int32 (the commit sets it to
    accepted - 1); x, z, out (batch, T, H, P); dt (batch, T, H, P) tied or (batch, T, H);
    A (H, P, N) tied or (H,); D, dt_bias (H, P) tied or (H,); B, C (batch, T, G, N).
    """
    library.call("all_states_ssu", states=states, state_index=state_index, x=x, dt=dt, A=A, B=B, C=C, out=out, D=D,
                 z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, state_batch_indices=state_batch_indices,
                 pad_slot_id=pad_slot_id, validate=validate)
    return out


def _all_states(states, state_index, x, dt, A, B, C, out, D, z, dt_bias, dt_softplus, state_batch_indices,
                pad_slot_id, validate):
    """The launcher of all_states_ssu (the op's implementation): checks every argument, then launches."""
    N, G, dt_c, A_h, D_h, bias_h = check_all_states_args(
        states, state_index, x, dt, A, B, C, out, D, z, dt_bias, state_batch_indices, pad_slot_id,
        check_slots=validate)
    batch, T, H, P = x.shape
    dev = x.device
    for name, t in (("states", states), ("x", x)):
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in KERNEL_DTYPES]}, got {t.dtype}")
    if states.stride(-1) != 1 or states.stride(-2) != N:
        raise ValueError(f"states: expected the last two dimensions packed, got strides {tuple(states.stride())}")
    check_kernel_layout(x, B, C, out, z)
    if batch == 0:
        return out
    block_p = min(ALL_STATES_BLOCK_P, max(16, triton.next_power_of_2(P)))
    npt = triton.cdiv(P, block_p)
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    s_z = z.stride()[:3] if z is not None else (0, 0, 0)
    _all_states_kernel[(batch * H * npt,)](
        states, state_index, x, dt_c, A_h, B, C, out, D_h if D_h is not None else dummy,
        z if z is not None else dummy, bias_h if bias_h is not None else dummy,
        state_batch_indices if state_batch_indices is not None else dummy,
        T, pad_slot_id, H, P, N, H // G, npt,
        states.stride(0), states.stride(1), states.stride(2), states.stride(3),
        *x.stride()[:3], *dt_c.stride(), *B.stride()[:3], *out.stride()[:3], *s_z,
        HAS_D=D_h is not None, HAS_Z=z is not None, HAS_BIAS=bias_h is not None,
        SOFTPLUS=bool(dt_softplus), HAS_SBI=state_batch_indices is not None,
        BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(N), num_warps=4)
    return out
