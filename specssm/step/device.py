"""Device functions shared by the step kernels (and the conv / baseline kernels that import them)."""
from __future__ import annotations

import triton
import triton.language as tl

from specssm.quant.rounding import COMPILED


@triton.jit
def softplus(v):
    # log(1 + exp(v)) loses all digits for v << 0 in fp32; exp(v) is exact to first order there
    return tl.where(v > 20.0, v, tl.where(v < -15.0, tl.exp(v), tl.log(1.0 + tl.exp(v))))


@triton.jit
def silu(v):
    """v·sigmoid(v). Compiled: one ex2 and one rcp (the approximate MUFU ops, ~2 ulp) where
    `v * tl.sigmoid(v)` spends ~14 instructions per element on range fixups of exp and the division;
    the products are rounded to the activations' 16 bits after this (or compared at fp32 tolerance).
    The interpreter, which has no inline PTX, takes the plain formula."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
            "rcp.approx.ftz.f32 t, t; mul.f32 $0, $1, t; }",
            "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1)
    return v * tl.sigmoid(v)


@triton.jit
def exp2(v):
    """2^v. Compiled: one MUFU.EX2 with denormal results flushed to zero (the plain exp2 adds a range
    fix-up per element); the interpreter takes tl.math.exp2."""
    if COMPILED:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.math.exp2(v)


@triton.jit
def wrap(i, L):
    """i mod L for 0 <= i < 2L: one conditional subtraction where `%` by a runtime L costs an integer
    division per element (~20 instructions)."""
    return tl.where(i >= L, i - L, i)


@triton.jit
def tile_masks(offs_p, offs_n, P, N, EVEN_TILE: tl.constexpr):
    """Row and column masks of a state tile. EVEN_TILE (tiles cover P and N exactly): constant-true
    masks, which the compiler drops from every access to the tile (a predicate per element otherwise)."""
    if EVEN_TILE:
        p_ok = tl.full((offs_p.shape[0],), 1, tl.int1)
        n_ok = tl.full((offs_n.shape[0],), 1, tl.int1)
    else:
        p_ok = offs_p < P
        n_ok = offs_n < N
    return p_ok, n_ok


@triton.jit
def row_tokens(cu_ptr, row, T, VARLEN: tl.constexpr):
    """(first token, token count, row offset) of a row: padded (batch, T) inputs index the row by
    row_off and tokens from 0; varlen inputs (cu_seqlens) index tokens from the row's first."""
    if VARLEN:
        tok0 = tl.load(cu_ptr + row).to(tl.int64)
        n_tok = (tl.load(cu_ptr + row + 1) - tok0).to(tl.int32)
        row_off = 0
    else:
        tok0 = 0
        n_tok = T
        row_off = row.to(tl.int64)
    return tok0, n_tok, row_off


@triton.jit
def dot16(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b on 16-bit operands, fp32 accumulation (products of 16-bit floats are exact in fp32).
    UPCAST (the CPU interpreter, whose bf16 dot is wrong) computes the same products in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc)


@triton.jit
def split_hi_lo(v, dtype: tl.constexpr):
    """fp32 v as hi + lo in a 16-bit dtype: hi = v rounded, lo = the remainder rounded (bf16: ~2^-17
    relative, the error of a tf32 operand squared), so a 16-bit product over (hi, lo) is nearly fp32."""
    hi = v.to(dtype)
    lo = (v - hi.to(tl.float32)).to(dtype)
    return hi, lo
