"""The fold of a slot's ring history into its checkpoint (docs/design.md), one device function shared by the
write main (specssm/step/mains.py) and materialize (specssm/step/materialize.py), so a flushed step and a
materialized slot compute the checkpoint the same way.
"""
from __future__ import annotations

import triton
import triton.language as tl

from specssm.step.device import dot16, split_hi_lo
from specssm.step.store import decode_state_tile


@triton.jit
def fold_history(S, S_scale, Xh, Bh, w, decay, KIND: tl.constexpr, UPCAST: tl.constexpr):
    """h_K = decay·S + (X_hist·w)ᵀ @ B_hist for one (BLOCK_P, BLOCK_N) state tile, in fp32.

    S: the tile as stored (codes for the scaled kinds, with S_scale its rows' decode scales); Xh (KH,
    BLOCK_P) and Bh (KH, BLOCK_N): the history's x and B in the activation dtype, zero past the keys to
    fold; w (KH,) fp32: the fold weights exp(Λ − c_k)·dt_k (0 past those keys); decay: exp(Λ). The fp32
    factor X·w goes into the 16-bit product as a (hi, lo) pair: nearly fp32 for a second product."""
    xw_hi, xw_lo = split_hi_lo(Xh.to(tl.float32) * w[:, None], Xh.dtype)
    hK = decay * decode_state_tile(S, S_scale, KIND)
    return dot16(tl.trans(xw_lo), Bh, dot16(tl.trans(xw_hi), Bh, hK, UPCAST), UPCAST)
