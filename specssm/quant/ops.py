"""Host-side launchers around the `specssm.quant` device functions: whole-tensor rounding and per-row
quantization (e.g. prefill writing a state into an int8 / fp8 cache), dequantization and raw random
words. Element i of the flattened input draws its random word at offset `offset + i`, so a launcher
call reproduces what a kernel calling the device functions with the same offsets stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from specssm._runtime import kernels_interpreted

from .philox import random_words as _random_words_dev
from .philox import random_words_rows as _random_words_rows_dev
from .rounding import (
    dequantize as _dequantize_dev,
)
from .rounding import (
    quantize,
    round_half,
    row_scale,
)

QUANT_DTYPES = {torch.int8: (0, 127.0), torch.float8_e4m3fn: (1, 448.0), torch.int16: (2, 32767.0)}
ROUND_DTYPES = {torch.float16: 0, torch.bfloat16: 1}


@triton.jit
def _words(seed, offset, rows, cols, N: tl.constexpr, BLOCK_N: tl.constexpr, ROWWISE: tl.constexpr,
           N_ROUNDS: tl.constexpr):
    if ROWWISE:
        return _random_words_rows_dev(seed, offset + rows * N, BLOCK_N, N_ROUNDS)
    else:
        return _random_words_dev(seed, offset + rows[:, None] * N + cols[None, :], N_ROUNDS)


@triton.jit
def _random_words_kernel(offsets_ptr, out_ptr, seed, numel, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    offs = tl.load(offsets_ptr + idx, mask=mask, other=0)
    w = _random_words_dev(seed, offs, N_ROUNDS)
    tl.store(out_ptr + idx, w.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _round_kernel(x_ptr, out_ptr, seed, offset, R, N: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, TARGET: tl.constexpr, STOCHASTIC: tl.constexpr,
                  ROWWISE: tl.constexpr, N_ROUNDS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    idx = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    if STOCHASTIC:
        r = _words(seed, offset, rows, cols, N, BLOCK_N, ROWWISE, N_ROUNDS)
    else:
        r = x
    tl.store(out_ptr + idx, round_half(x, r, TARGET, STOCHASTIC), mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scale_ptr, seed, offset, R, N: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, TARGET: tl.constexpr, QMAX: tl.constexpr,
                     STOCHASTIC: tl.constexpr, ROWWISE: tl.constexpr, N_ROUNDS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    idx = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + idx, mask=mask, other=0.0)
    scale, scale_inv = row_scale(x, QMAX)
    si = scale_inv[:, None]
    if STOCHASTIC:
        r = _words(seed, offset, rows, cols, N, BLOCK_N, ROWWISE, N_ROUNDS)
    else:
        r = x
    tl.store(codes_ptr + idx, quantize(x, si, r, TARGET, STOCHASTIC, True), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < R)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, out_ptr, R, N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    idx = rows[:, None] * N + cols[None, :]
    q = tl.load(codes_ptr + idx, mask=mask)
    s = tl.load(scale_ptr + rows, mask=rows < R, other=1.0)
    tl.store(out_ptr + idx, _dequantize_dev(q, s[:, None]), mask=mask)


# ------------------------------------------------------------------------------------ launchers

def _row_blocks(R: int, N: int):
    block_n = triton.next_power_of_2(max(N, 4))
    # the interpreter pays per op, not per element: few large programs there
    target = (1 << 16) if kernels_interpreted() else 4096
    block_m = max(1, min(triton.next_power_of_2(max(R, 1)), target // block_n))
    return block_m, block_n, triton.cdiv(R, block_m)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: got {type(seed).__name__}, expected a Python int")
    if not -(1 << 63) <= seed < (1 << 64):
        raise ValueError(f"seed: got {seed}, expected a 64-bit integer")
    return seed - (1 << 64) if seed >= (1 << 63) else seed      # pass as int64, same bits


def _check_rows_input(x, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: got {type(x).__name__}, expected a torch.Tensor")
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: got dtype {x.dtype}, expected torch.float32")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"{name}: got shape {tuple(x.shape)}, expected a non-empty tensor (..., N)")
    if x.shape[-1] > 1024:
        raise ValueError(f"{name}: got rows of length {x.shape[-1]}, expected at most 1024")


def _check_offset(offset):
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset >= (1 << 62):
        raise ValueError(f"offset: got {offset!r}, expected an int in [0, 2**62)")


def _check_rounds(n_rounds):
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, int) or not 1 <= n_rounds <= 16:
        raise ValueError(f"n_rounds: got {n_rounds!r}, expected an int in [1, 16]")


def random_words(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """Philox random word per element offset.

    seed: int (64-bit); offsets: int64 tensor of offsets >= 0, any shape. Returns an int32 tensor of the
    same shape holding the uint32 bits (view it as uint32 with `.numpy().view(np.uint32)` on CPU)."""
    seed = _check_seed(seed)
    _check_rounds(n_rounds)
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
        raise TypeError(f"offsets: got {getattr(offsets, 'dtype', type(offsets).__name__)}, expected an int64 tensor")
    flat = offsets.contiguous().reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.int32, device=offsets.device)
    if flat.numel():
        block = 1 << 16 if kernels_interpreted(_random_words_kernel) else 1024
        _random_words_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, seed, flat.numel(),
                                                                  N_ROUNDS=n_rounds, BLOCK=block)
    return out.reshape(offsets.shape)


def _rowwise(N: int, offset: int, rowwise) -> bool:
    aligned = N % 4 == 0 and offset % 4 == 0
    if rowwise is None:
        return aligned
    if rowwise and not aligned:
        raise ValueError(f"rowwise: got True with row length {N} and offset {offset}, "
                         "expected both multiples of 4")
    return bool(rowwise)


def _rows_launch_args(x, seed, offset, n_rounds):
    """The checks and row geometry shared by round_to and quantize_rows: (seed, x contiguous, N, rows)."""
    seed = _check_seed(seed)
    _check_offset(offset)
    _check_rounds(n_rounds)
    xc = x.contiguous()
    N = xc.shape[-1]
    return seed, xc, N, xc.numel() // N


def round_to(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = False, seed: int = 0,
             offset: int = 0, n_rounds: int = 10, rowwise=None) -> torch.Tensor:
    """Round an fp32 tensor (..., N), contiguous, to torch.float16 or torch.bfloat16.

    stochastic=False: round to nearest even. stochastic=True: stochastic rounding, element i of the
    flattened tensor uses the random word at offset `offset + i` under `seed`. rowwise (None = when
    possible) picks the 4-elements-per-Philox path; results are identical either way."""
    _check_rows_input(x)
    if dtype not in ROUND_DTYPES:
        raise ValueError(f"dtype: got {dtype}, expected torch.float16 or torch.bfloat16")
    seed, xc, N, R = _rows_launch_args(x, seed, offset, n_rounds)
    out = torch.empty(xc.shape, dtype=dtype, device=x.device)
    block_m, block_n, grid = _row_blocks(R, N)
    _round_kernel[(grid,)](xc, out, seed, offset, R, N=N, BLOCK_M=block_m, BLOCK_N=block_n,
                           TARGET=ROUND_DTYPES[dtype], STOCHASTIC=bool(stochastic),
                           ROWWISE=_rowwise(N, offset, rowwise), N_ROUNDS=n_rounds)
    return out


def quantize_rows(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = False, seed: int = 0,
                  offset: int = 0, n_rounds: int = 10, rowwise=None):
    """Quantize each row (last axis) of an fp32 tensor (..., N), N <= 1024, with one fp32 decode scale.

    dtype: torch.int8 (QMAX 127), torch.float8_e4m3fn (448) or torch.int16 (32767).
    Returns (codes (..., N) of dtype, scale (...) float32); decode = codes * scale[..., None].
    Random words as in `round_to`."""
    _check_rows_input(x)
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"dtype: got {dtype}, expected one of {list(QUANT_DTYPES)}")
    seed, xc, N, R = _rows_launch_args(x, seed, offset, n_rounds)
    target, qmax = QUANT_DTYPES[dtype]
    codes = torch.empty(xc.shape, dtype=dtype, device=x.device)
    scale = torch.empty(xc.shape[:-1], dtype=torch.float32, device=x.device)
    block_m, block_n, grid = _row_blocks(R, N)
    _quantize_kernel[(grid,)](xc, codes, scale, seed, offset, R, N=N, BLOCK_M=block_m, BLOCK_N=block_n,
                              TARGET=target, QMAX=qmax, STOCHASTIC=bool(stochastic),
                              ROWWISE=_rowwise(N, offset, rowwise), N_ROUNDS=n_rounds)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (..., N) int8 / float8_e4m3fn / int16, scale (...) float32 -> float32 codes * scale (fp32 product)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype not in QUANT_DTYPES:
        raise TypeError(f"codes: got {getattr(codes, 'dtype', type(codes).__name__)}, "
                        f"expected a tensor of {list(QUANT_DTYPES)}")
    if (not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32
            or tuple(scale.shape) != tuple(codes.shape[:-1])):
        raise ValueError(f"scale: got {getattr(scale, 'dtype', None)} {tuple(getattr(scale, 'shape', ()))}, "
                         f"expected float32 of shape {tuple(codes.shape[:-1])}")
    cc, sc = codes.contiguous(), scale.contiguous()
    N = cc.shape[-1]
    R = cc.numel() // N
    out = torch.empty(cc.shape, dtype=torch.float32, device=codes.device)
    block_m, block_n, grid = _row_blocks(R, N)
    _dequantize_kernel[(grid,)](cc, sc, out, R, N=N, BLOCK_M=block_m, BLOCK_N=block_n)
    return out
