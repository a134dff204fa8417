"""Loading and storing a state tile in its storage format (device functions of the SSM kernels).

KIND codes: 0 fp32, 1 bf16, 2 fp16, 3 int8, 4 fp8 e4m3, 5 int16. The 8/16-bit integer and fp8 kinds
keep one fp32 decode scale per state row (slot, head, p) over N, so their tiles hold whole rows.
Rounding (RN or stochastic, with Philox bits keyed by the slot's seed and the element's offset in the
state pool) is done with integer arithmetic in specssm.quant, identical on sm_90 and the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm.quant.philox import random_words, random_words_rows
from specssm.quant.rounding import COMPILED, quantize, round_half, row_scale

STATE_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3,
              torch.float8_e4m3fn: 4, torch.int16: 5}


# int8 codes to bf16, four per 32-bit register: PRMT puts 0x43 above each code byte; the lane with the
# code's sign bit cleared reads 128 + (q & 0x7F), the one with only the sign bit 128 or 256 (the sign bit
# lands in the exponent); their bf16x2 difference is q, exactly
_I8_TO_BF16 = tl.constexpr("{ .reg .b32 w, a, b, hi; mov.b32 hi, 0x43434343; "
               "prmt.b32 w, $2, hi, 0x4140; and.b32 a, w, 0xFF7FFF7F; and.b32 b, w, 0xFF80FF80; "
               "sub.rn.bf16x2 $0, a, b; "
               "prmt.b32 w, $2, hi, 0x4342; and.b32 a, w, 0xFF7FFF7F; and.b32 b, w, 0xFF80FF80; "
               "sub.rn.bf16x2 $1, a, b; }")
# int8 codes to fp16: q ^ 0x80 = q + 128 in the low byte under 0x64 reads 1024 + q + 128; minus 1152
_I8_TO_F16 = tl.constexpr("{ .reg .b32 u, w, hi, k; mov.b32 hi, 0x64646464; mov.b32 k, 0x64806480; "
              "xor.b32 u, $2, 0x80808080; "
              "prmt.b32 w, u, hi, 0x4140; sub.rn.f16x2 $0, w, k; "
              "prmt.b32 w, u, hi, 0x4342; sub.rn.f16x2 $1, w, k; }")


@triton.jit
def codes_to_f32(raw, KIND: tl.constexpr):
    """A state tile's stored values as fp32, unscaled. int8 codes go through the fp32 bit pattern
    (2**23 + 128 + q, exact) on the full-rate integer and fp32 pipes, where the int-to-float
    conversion instruction runs at a quarter of their rate. (The same from packed bytes, one PRMT and one
    subtraction per code in inline PTX, cost the int8 write program more spills than it saved.)"""
    if KIND == 3:
        v = (raw.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        v = raw.to(tl.float32)
    return v


@triton.jit
def codes_to_half(raw, dtype: tl.constexpr):
    """A tile of int8 codes as bf16 or fp16 (exact: |q| <= 128), the operand of a 16-bit product.
    Compiled: two instructions per code from packed bytes instead of ~4 through fp32; the interpreter,
    which has no inline PTX, goes through fp32."""
    if not COMPILED:
        h = codes_to_f32(raw, 3).to(dtype)
    elif dtype == tl.bfloat16:
        h = tl.inline_asm_elementwise(_I8_TO_BF16, "=r,=r,r", [raw], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        h = tl.inline_asm_elementwise(_I8_TO_F16, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)
    return h


@triton.jit
def decode_state_tile(raw, scale, KIND: tl.constexpr):
    """A loaded (BLOCK_P, cols) state tile decoded to fp32 (`scale`: the rows' decode scales, 8/16-bit
    integer and fp8 kinds only)."""
    v = codes_to_f32(raw, KIND)
    if KIND >= 3:
        v = v * scale[:, None]
    return v


@triton.jit
def encode_state_tile(h, mask, seed_ptr, slot, row_off, off, dtype: tl.constexpr, KIND: tl.constexpr,
                      SR: tl.constexpr, SR_ROWS: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    """The fp32 tile h (rows of a state pool) in the storage format: (codes, row scales; 1.0 for the
    unscaled kinds). Stochastic rounding keys its bits on the slot's seed and each element's offset in
    the state pool, `off` (rows' offsets `row_off` + column). SR_ROWS (every row_off a multiple of 4,
    columns contiguous) draws them at one Philox evaluation per four elements, the same bits.
    Compiled, bf16 / fp16 round-to-nearest is the hardware's RN-even conversion (one instruction per
    pair; the same bits as the integer path the interpreter takes, whose own cast truncates)."""
    if SR and KIND != 0:
        seed = tl.load(seed_ptr + slot)
        if SR_ROWS:
            rbits = random_words_rows(seed, row_off, h.shape[1], PHILOX_ROUNDS)
        else:
            rbits = random_words(seed, off, PHILOX_ROUNDS)
    scale = 1.0
    if KIND == 0:
        q = h
    elif KIND == 1 or KIND == 2:
        if SR:
            q = round_half(h, rbits, 2 - KIND, True)
        elif COMPILED:
            q = h.to(dtype)
        else:
            q = round_half(h, h, 2 - KIND, False)
    else:
        hz = tl.where(mask, h, 0.0)
        if KIND == 3:
            scale, sinv = row_scale(hz, 127.0)
        elif KIND == 4:
            scale, sinv = row_scale(hz, 448.0)
        else:
            scale, sinv = row_scale(hz, 32767.0)
        if not SR:
            rbits = hz
        q = quantize(hz, sinv[:, None], rbits, KIND - 3, SR, True)
    return q.to(dtype), scale


@triton.jit
def store_state_tile(h, state_ptr, scale_ptr, off, row_off, mask, scale_off, p_ok, seed_ptr, slot, pool_off,
                     KIND: tl.constexpr, SR: tl.constexpr, SR_ROWS: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    """Round the fp32 tile h to the storage format (and its row scales) and store it at state_ptr + off
    (off = row_off[:, None] + column; pool_off: the tile's offset in the pool, which keys SR's bits)."""
    q, scale = encode_state_tile(h, mask, seed_ptr, slot, pool_off + row_off, pool_off + off,
                                 state_ptr.dtype.element_ty, KIND, SR, SR_ROWS, PHILOX_ROUNDS)
    tl.store(state_ptr + off, q, mask=mask)
    if KIND >= 3:
        tl.store(scale_ptr + scale_off, scale, mask=p_ok)
