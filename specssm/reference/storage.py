"""How a state is stored: round-to-nearest casts, int8 / fp8 e4m3 with a per-row decode scale, and
stochastic rounding given random bits.

A stored state `(..., P, N)` of an 8-bit dtype comes with `scale (..., P)` float32 (decode: q·scale,
scale = amax over N / qmax). All-zero rows store scale 1 and codes 0, so they decode to exact zeros.
"""
from __future__ import annotations

import torch

QMAX = {torch.int8: 127.0, torch.int16: 32767.0, torch.float8_e4m3fn: 448.0}


def is_quantized(dtype) -> bool:
    return dtype in QMAX


def decode_state(stored, scale=None):
    """Stored state (and its scale for 8-bit dtypes) -> float64."""
    v = stored.to(torch.float64, copy=True)
    if is_quantized(stored.dtype):
        v = v * scale.double()[..., None]
    return v


def row_scale(h, dtype):
    """fp32 decode scale per row over the last dim; 1 for all-zero rows."""
    amax = h.abs().amax(dim=-1).float()
    scale = amax / QMAX[dtype]
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def encode_state(h, dtype, rounding="rn", rand_bits=None):
    """Round a float64 state `h (..., P, N)` to `dtype`. Returns (stored, scale or None).

    rounding "rn": round to nearest even. "sr": stochastic rounding driven by `rand_bits` (int64
    tensor of uint32 values, same shape as h), defined in specssm.quant.reference.
    """
    if rounding not in ("rn", "sr"):
        raise ValueError(f"rounding: expected 'rn' or 'sr', got {rounding!r}")
    scale = None
    v = h.double()
    if is_quantized(dtype):
        scale = row_scale(v, dtype)
        v = v / scale.double()[..., None]
    if rounding == "sr":
        if rand_bits is None:
            raise ValueError("rand_bits: expected a tensor of uint32 words for rounding='sr', got None")
        from specssm.quant import reference as qref
        return qref.stochastic_round(v.float(), dtype, rand_bits), scale
    if dtype == torch.int8 or dtype == torch.int16:
        q = QMAX[dtype]
        return torch.round(v).clamp(-q, q).to(dtype), scale
    return v.float().to(dtype) if dtype != torch.float64 else v, scale
