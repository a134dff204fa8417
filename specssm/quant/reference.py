"""Plain numpy / PyTorch references for `specssm.quant` (the specification the Triton device functions
must match bit for bit).

Written independently of the kernels: Philox with 64-bit numpy products, rounding by locating the value
between its two grid neighbours in float64 (not by bit tricks on the fp32 pattern), and the final
conversions by torch casts of values that are already exactly representable.

Every function accepts float32 input (then it reproduces the kernels bit for bit) or float64 input
(then the same definitions are applied to the float64 value: the exact specification, e.g. for
comparing with a float64 model of the SSM).

Definitions (shared with `rounding.py`):

* grid of a target format: |v| is rounded on the grid of spacing 2**q, q = max(e, EMIN) - MANT_BITS,
  e = floor(log2 |v|); (MANT_BITS, EMIN) = (7, -126) bf16, (10, -14) fp16, (3, -6) fp8 e4m3,
  (7, 7) int8 and (15, 15) int16 (integers: spacing 1).
* k = floor(|v| / 2**q), frac = |v| / 2**q - k in [0, 1), f32 = floor(frac * 2**32).
* round-to-nearest-even: up = frac > 1/2, or frac == 1/2 and k odd.
* stochastic rounding with 32-bit random word r: up = (r + f32 >= 2**32), i.e. P(up) = f32 / 2**32,
  which equals frac exactly whenever frac is a multiple of 2**-32 (always for bf16; for fp16 when
  |v| >= 2**-33; for fp8 |v| >= 2**-18; int8 / int16 |v| >= 2**-9 code units). Below that P(up) is
  frac rounded down to a multiple of 2**-32 (bias < 2**-32 grid steps).
* result = sign(v) * (k + up) * 2**q. fp16/bf16: a result beyond the largest finite value is inf
  (IEEE overflow, as the round-to-nearest cast does); NaN stays NaN, +-inf stay +-inf.
* int8 / fp8 / int16 with a per-row scale: amax = max |x| over the row (last axis), NaN counting as
  inf; a = QMAX if amax == 0 else max(amax, AMAX_FLOOR); scale = a / QMAX and scale_inv = QMAX / a
  (each one IEEE fp32 division); v = clamp(x * scale_inv, -QMAX, QMAX), code = rounded v,
  decode = code * scale. An all-zero row gets scale 1 and codes 0 (decodes to exact zeros; the same
  convention as specssm/reference/storage.py). AMAX_FLOOR = 2**-100 only touches rows whose largest
  magnitude is below ~7.9e-31: it keeps scale normal and scale_inv finite (QMAX / amax overflows fp32
  for amax below ~1e-34). A row holding NaN or +-inf gets scale = +inf and codes 0, so it decodes to
  NaN everywhere (0 * inf): a poisoned row never comes back silently finite.
"""
from __future__ import annotations

import numpy as np
import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

AMAX_FLOOR = 2.0 ** -100

# name -> (mantissa bits, min exponent of the grid, qmax or None, torch dtype)
FORMATS = {
    "bf16": (7, -126, None, torch.bfloat16),
    "fp16": (10, -14, None, torch.float16),
    "fp8": (3, -6, 448.0, torch.float8_e4m3fn),
    "int8": (7, 7, 127.0, torch.int8),
    "int16": (15, 15, 32767.0, torch.int16),
}
SCALED_FORMATS = ("int8", "fp8", "int16")


def _format_name(fmt) -> str:
    by_dtype = {v[3]: k for k, v in FORMATS.items()}
    if isinstance(fmt, torch.dtype):
        if fmt not in by_dtype:
            raise ValueError(f"fmt: got {fmt}, expected one of {list(by_dtype)}")
        return by_dtype[fmt]
    if fmt not in FORMATS:
        raise ValueError(f"fmt: got {fmt!r}, expected one of {list(FORMATS)}")
    return fmt


# ----------------------------------------------------------------------------------------- Philox

def philox4x32_ref(c0, c1, c2, c3, k0, k1, n_rounds: int = 10):
    """Philox4x32-n_rounds on numpy arrays (anything broadcastable, values taken mod 2**32).
    Returns four np.uint32 arrays."""
    c0, c1, c2, c3, k0, k1 = (np.asarray(v, dtype=np.uint64) & np.uint64(MASK32)
                              for v in (c0, c1, c2, c3, k0, k1))
    m0, m1, mask = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(MASK32)
    for _ in range(n_rounds):
        p0 = c0 * m0            # < 2**64: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0 = (k0 + np.uint64(PHILOX_W0)) & mask
        k1 = (k1 + np.uint64(PHILOX_W1)) & mask
    return tuple(np.asarray(c, dtype=np.uint64).astype(np.uint32) for c in (c0, c1, c2, c3))


def random_words_ref(seed: int, offsets, n_rounds: int = 10) -> np.ndarray:
    """uint32 random word of each element offset (see philox.py for the definition).
    seed: Python int (taken mod 2**64); offsets: ints >= 0 below 2**64 (array-like or torch tensor)."""
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.cpu().numpy()
    off = np.asarray(offsets)
    if off.dtype.kind == "i" and off.size and off.min() < 0:
        raise ValueError(f"offsets: got a negative offset {off.min()}, expected offsets >= 0")
    off = off.astype(np.uint64)
    s = int(seed) % (1 << 64)
    ctr = off >> np.uint64(2)
    words = philox4x32_ref(ctr & np.uint64(MASK32), ctr >> np.uint64(32), 0, 0,
                           s & MASK32, s >> 32, n_rounds)
    lane = (off & np.uint64(3)).astype(np.int64)
    return np.choose(lane, words).astype(np.uint32)


# ------------------------------------------------------------------------------- grid rounding

def _as_words(words, shape) -> torch.Tensor:
    if isinstance(words, torch.Tensor):
        w = words.cpu()
        w = w.to(torch.int64) & MASK32 if w.dtype != torch.uint32 else w.to(torch.int64)
    else:
        w = torch.from_numpy(np.asarray(words, dtype=np.uint32).astype(np.int64))
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"words: got shape {tuple(w.shape)}, expected {tuple(shape)} (one per element)")
    return w


def grid_split_ref(v: torch.Tensor, fmt):
    """Locate |v| on the grid of `fmt`: returns (k, frac32, step) as float64 tensors with
    |v| = (k + frac32 / 2**32 + tail) * step, 0 <= tail < 2**-32 (tail = 0 when frac is a multiple of
    2**-32). Finite inputs only."""
    name = _format_name(fmt)
    mant_bits, emin, _, _ = FORMATS[name]
    a = v.detach().cpu().to(torch.float64).abs()
    _, e = torch.frexp(a)                      # a = m * 2**e, m in [0.5, 1)
    e = torch.where(a > 0, e - 1, torch.full_like(e, emin))
    q = torch.clamp(e, min=emin) - mant_bits
    step = torch.ldexp(torch.ones_like(a), q)
    scaled = a / step                          # exact: power-of-two scaling
    k = torch.floor(scaled)
    frac32 = torch.floor((scaled - k) * 2.0 ** 32)
    return k, frac32, step


def _round_on_grid(v: torch.Tensor, fmt, words=None) -> torch.Tensor:
    """float64 tensor: v rounded on the grid of fmt (RN-even when words is None, else SR)."""
    k, frac32, step = grid_split_ref(v, fmt)
    if words is None:
        half = 2.0 ** 31
        up = (frac32 > half) | ((frac32 == half) & (torch.remainder(k, 2) == 1))
    else:
        up = (_as_words(words, v.shape).to(torch.float64) + frac32) >= 2.0 ** 32
    mag = (k + up.to(torch.float64)) * step
    v64 = v.detach().cpu().to(torch.float64)
    return torch.where(torch.signbit(v64), -mag, mag)


def round_sr_ref(x: torch.Tensor, words, dtype: torch.dtype) -> torch.Tensor:
    """Stochastic rounding of x (float32 or float64) to dtype (torch.bfloat16 or torch.float16) with one
    uint32 random word per element. Overflow beyond the largest finite value gives inf; NaN/inf kept."""
    name = _format_name(dtype)
    if name not in ("bf16", "fp16"):
        raise ValueError(f"dtype: got {dtype}, expected torch.bfloat16 or torch.float16")
    x64 = x.detach().cpu().to(torch.float64)
    finite = torch.isfinite(x64)
    r = _round_on_grid(torch.where(finite, x64, 0.0), name, words)
    out = torch.where(finite, r, x64)          # nan / inf pass through; finite overflow -> inf in the cast
    return out.to(dtype)


def round_rn_ref(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest-even of x to bf16/fp16 (the plain torch cast)."""
    return x.detach().cpu().to(dtype)


def stochastic_round(v: torch.Tensor, dtype: torch.dtype, rand_bits) -> torch.Tensor:
    """Stochastic rounding of already-scaled values v (float32 or float64) to `dtype`, one uint32 word
    per element in `rand_bits` (numpy uint32, or a torch tensor whose low 32 bits are used, e.g. int64).

    dtype torch.float16 / torch.bfloat16: as `round_sr_ref`. torch.int8 / torch.int16 /
    torch.float8_e4m3fn: v is the value in code units (x / scale); clamped to [-QMAX, QMAX], NaN -> 0,
    then rounded between its two grid neighbours (the same rule as the kernels after x * scale_inv).
    torch.float32 / torch.float64: returned unchanged (cast to dtype)."""
    if dtype in (torch.float32, torch.float64):
        return v.detach().cpu().to(dtype)
    name = _format_name(dtype)
    if name in ("bf16", "fp16"):
        return round_sr_ref(v, rand_bits, dtype)
    qmax = FORMATS[name][2]
    vc = v.detach().cpu()
    vc = torch.clamp(torch.where(torch.isnan(vc), torch.zeros_like(vc), vc), -qmax, qmax)
    r = _round_on_grid(vc, name, rand_bits)
    return r.to(dtype) if dtype.is_floating_point else r.to(torch.int64).to(dtype)


def row_scale_ref(x: torch.Tensor, fmt):
    """Per-row decode scale and its inverse over the last axis: (scale, scale_inv), each x.shape[:-1],
    in x's dtype (float32 reproduces the kernels). See the module docstring for the definition."""
    name = _format_name(fmt)
    if name not in SCALED_FORMATS:
        raise ValueError(f"fmt: got {fmt}, expected one of {SCALED_FORMATS}")
    qmax = FORMATS[name][2]
    xc = x.detach().cpu()
    dt = xc.dtype
    a = torch.where(torch.isnan(xc), torch.tensor(float("inf"), dtype=dt), xc.abs())
    amax = a.amax(dim=-1)
    q = torch.tensor(qmax, dtype=dt)
    amax = torch.where(amax == 0, q, torch.clamp(amax, min=AMAX_FLOOR))
    return amax / q, q / amax


def scaled_values_ref(x: torch.Tensor, scale_inv: torch.Tensor, fmt) -> torch.Tensor:
    """v = clamp(x * scale_inv, -QMAX, QMAX) in x's dtype, NaN -> 0 (the value that gets rounded)."""
    name = _format_name(fmt)
    qmax = FORMATS[name][2]
    xc = x.detach().cpu()
    v = xc * scale_inv.to(xc.dtype).unsqueeze(-1)
    v = torch.where(torch.isnan(v), torch.zeros_like(v), v)
    return torch.clamp(v, -qmax, qmax)


def quantize_ref(x: torch.Tensor, fmt, words=None, scale_inv=None, scale=None):
    """Quantize rows (last axis) of x to int8 / float8_e4m3fn / int16 codes with one decode scale per row.
    words None -> round-to-nearest-even, else stochastic rounding with those uint32 words.
    Returns (codes, scale); pass scale_inv (and scale) to use given scales instead of the row amax."""
    name = _format_name(fmt)
    if name not in SCALED_FORMATS:
        raise ValueError(f"fmt: got {fmt}, expected one of {SCALED_FORMATS}")
    if scale_inv is None:
        scale, scale_inv = row_scale_ref(x, name)
    v = scaled_values_ref(x, scale_inv, name)
    r = _round_on_grid(v, name, words)
    dtype = FORMATS[name][3]
    codes = r.to(dtype) if dtype.is_floating_point else r.to(torch.int64).to(dtype)
    return codes, scale


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Decode = code * scale (per row), computed exactly in float64."""
    return codes.detach().cpu().to(torch.float64) * scale.detach().cpu().to(torch.float64).unsqueeze(-1)


def grid_values(fmt) -> torch.Tensor:
    """All finite values of fmt, sorted, as float64 (for tests: neighbours by search, an independent
    description of the grid). fp16/bf16 also get +-inf as the neighbours beyond the largest value."""
    name = _format_name(fmt)
    if name == "int8":
        vals = torch.arange(-127, 128, dtype=torch.float64)
    elif name == "int16":
        vals = torch.arange(-32767, 32768, dtype=torch.float64)
    else:
        bits = {"bf16": (torch.int16, torch.bfloat16), "fp16": (torch.int16, torch.float16),
                "fp8": (torch.uint8, torch.float8_e4m3fn)}[name]
        n = 1 << (16 if bits[0] == torch.int16 else 8)
        raw = torch.arange(n, dtype=torch.int64)
        if bits[0] == torch.int16:
            raw = torch.where(raw >= 1 << 15, raw - (1 << 16), raw)
        vals = raw.to(bits[0]).view(bits[1]).to(torch.float64)
        vals = vals[torch.isfinite(vals)]
        if name == "fp8":
            vals = vals[vals.abs() <= 448]
        vals = torch.unique(vals)   # merges +0 / -0
        if name in ("bf16", "fp16"):
            vals = torch.cat([torch.tensor([-float("inf")], dtype=torch.float64), vals,
                              torch.tensor([float("inf")], dtype=torch.float64)])
    return torch.sort(vals).values


def neighbours_ref(v: torch.Tensor, fmt):
    """(lo, hi): largest grid value <= v and smallest >= v (float64), found by search in grid_values."""
    g = grid_values(fmt)
    v64 = v.detach().cpu().to(torch.float64).reshape(-1)
    hi_i = torch.searchsorted(g, v64, right=False).clamp(max=len(g) - 1)
    lo_i = (torch.searchsorted(g, v64, right=True) - 1).clamp(min=0)
    return g[lo_i].reshape(v.shape), g[hi_i].reshape(v.shape)
