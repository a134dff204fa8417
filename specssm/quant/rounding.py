"""Rounding and quantization of fp32 blocks for the state store path, as inlineable Triton device functions.

All functions take fp32 blocks of any shape (2-D for the per-row scale) and never rely on the
interpreter's float down-casts for a rounding decision: the rounded value is assembled from integer
arithmetic on the fp32 bit pattern (or, for the integer grids, from exact fp32 operations) and bit-cast
into the target type. So the results are the same on sm_90 and in the CPU interpreter (whose fp32->bf16
cast truncates and whose fp32->fp8 cast mis-rounds across powers of two). One exception, for speed:
compiled, fp8 round-to-nearest is the hardware's RN-even saturating cast, which gives the same bits
(the GPU suite checks it against the reference on 1M values and the edge cases).

Grid of a format (MANT_BITS, EMIN): |v| is rounded on spacing 2**q, q = max(e, EMIN) - MANT_BITS,
e = floor(log2 |v|): bf16 (7, -126), fp16 (10, -14), fp8 e4m3 (3, -6), int8 (7, 7), int16 (15, 15).
With k = floor(|v| / 2**q) and f32 = floor(frac * 2**32) (frac = the remaining fraction of a step):

* RN (round to nearest, ties to even): away from zero iff frac > 1/2 or (frac == 1/2 and k odd).
* SR with a uint32 random word r: away from zero iff r + f32 >= 2**32, so P = f32 / 2**32 = frac
  (exact whenever frac is a multiple of 2**-32: always for bf16, for fp16 |v| >= 2**-33, fp8
  |v| >= 2**-18, int8 / int16 |v| >= 2**-9 code units; below, the bias is < 2**-32 grid steps).
  The result is always one of the two grid neighbours of v, and E[result] = v. Only the top bits
  of r that the grid needs are used (the top 16 for bf16, 13 for normal fp16, 20 for normal fp8).
* Special values (fp16/bf16): NaN -> quiet NaN (sign kept), +-inf -> +-inf, finite values whose upper
  neighbour lies beyond the largest finite value round to inf with the SR probability (IEEE overflow,
  the same convention as the round-to-nearest cast). int8 / fp8 / int16 clamp v to [-QMAX, QMAX]
  first (only rounding noise of x * scale_inv can exceed it), map NaN to 0; fp8 never produces NaN.
* Per-row scale (int8 / fp8 / int16): amax = max |x| over the last axis (NaN counts as inf),
  a = QMAX if amax == 0 else max(amax, 2**-100), scale = a / QMAX, scale_inv = QMAX / a (IEEE
  divisions, `div_rn`), codes = round(clamp(x * scale_inv)), decode = code * scale. All-zero rows:
  scale 1, codes 0, decode exactly 0. The 2**-100 floor (rows below ~7.9e-31 only) keeps the scale
  normal and scale_inv finite. Rows with NaN/inf: scale = inf, codes 0, decode NaN everywhere.

Random words come from `philox.random_words` (any offsets) or `philox.random_words_rows` (rows of
a contiguous pool, 4x fewer Philox evaluations); both give identical bits for the same offsets.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from specssm._runtime import interpreting

from .philox import random_words

AMAX_FLOOR = tl.constexpr(2.0 ** -100)   # constexpr: readable from compiled @jit code
# compiled (not the CPU interpreter): fp8 round-to-nearest by the hardware cast (the interpreter's cast
# mis-rounds across powers of two, so it takes the integer path, the same bits), and libdevice's
# explicitly rounded add (the interpreter has no libdevice)
COMPILED = tl.constexpr(not interpreting())


# ------------------------------------------------------------------------------ grid primitives

@triton.jit
def _grid_round(v, rbits, MANT_BITS: tl.constexpr, EMIN: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Round |v| (fp32 block) on the grid (MANT_BITS, EMIN). Returns (sign, code): sign = the fp32 sign
    bit (uint32, 0 or 0x80000000) and code = the magnitude's code (uint32), where code counts grid
    points from zero across binades: ((max(e, EMIN) - EMIN) << MANT_BITS) + steps, i.e. the bit
    pattern of the magnitude in a float format with that mantissa width and min exponent (and the
    integer itself for the integer grids). Garbage for inf/NaN inputs: callers handle those."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    exp_field = ((bits >> 23) & 0xFF).to(tl.int32)
    sig = bits & 0x7FFFFF
    sig = tl.where(exp_field > 0, sig | 0x800000, sig)           # |v| = sig * 2**(e - 23)
    e = tl.maximum(exp_field, 1) - 127
    # low bits of sig below the grid step: shift >= 23 - MANT_BITS >= 8; shifts >= 32 are clamped
    # because LLVM shifts by >= the bit width are poison
    shift = (23 - MANT_BITS) + tl.maximum(EMIN - e, 0)
    sh = tl.minimum(shift, 31).to(tl.uint32)
    one = tl.full((), 1, tl.uint32)
    in_range = shift < 24                                           # else |v| < one step: k = 0
    k = tl.where(in_range, sig >> sh, 0).to(tl.uint32)
    low = tl.where(in_range, sig & ((one << sh) - 1), sig)
    # frac32 = floor(low * 2**(32 - shift))
    up_sh = tl.minimum(tl.maximum(32 - shift, 0), 31).to(tl.uint32)
    dn_sh = tl.minimum(tl.maximum(shift - 32, 0), 31).to(tl.uint32)
    frac32 = tl.where(shift <= 32, low << up_sh, low >> dn_sh)
    if STOCHASTIC:
        up = rbits.to(tl.uint32, bitcast=True) > (frac32 ^ 0xFFFFFFFF)   # r + frac32 >= 2**32
    else:
        half = tl.full((), 0x80000000, tl.uint32)
        up = (frac32 > half) | ((frac32 == half) & ((k & 1) == 1))
    base = ((tl.maximum(e, EMIN) - EMIN) << MANT_BITS).to(tl.uint32)
    return sign, base + k + up.to(tl.uint32)


@triton.jit
def _to_fp16(x, rbits, STOCHASTIC: tl.constexpr):
    sign, code = _grid_round(x, rbits, 10, -14, STOCHASTIC)
    code = tl.minimum(code, 0x7C00)                                 # beyond 65504 (and inf) -> inf
    code = tl.where(x == x, code, 0x7E00)                           # quiet NaN
    return ((sign >> 16) | code).to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _bf16_from_bits(x, hi16):
    """hi16: the rounded upper half (uint32 block); patches NaN (a truncated NaN may read as inf)."""
    bits = x.to(tl.uint32, bitcast=True)
    hi16 = tl.where(x == x, hi16, (bits >> 16) | 0x0040)
    return hi16.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# ------------------------------------------------------------------------------ fp16 / bf16

@triton.jit
def round_fp16_rn(x):
    """fp32 block -> fp16, round to nearest even (overflow -> inf)."""
    return _to_fp16(x, x, False)


@triton.jit
def round_fp16_sr(x, rbits):
    """fp32 block -> fp16, stochastic rounding with uint32 random words rbits (same shape)."""
    return _to_fp16(x, rbits, True)


@triton.jit
def round_bf16_rn(x):
    """fp32 block -> bf16, round to nearest even on the bit pattern (the interpreter's cast truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    return _bf16_from_bits(x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)


@triton.jit
def round_bf16_sr(x, rbits):
    """fp32 block -> bf16, stochastic rounding: add the top 16 bits of the random word to the low half
    of the fp32 pattern and truncate (fp32 patterns of one sign are monotone in magnitude, so the carry
    moves to the next bf16 value, across binades, subnormals and into inf alike)."""
    bits = x.to(tl.uint32, bitcast=True)
    return _bf16_from_bits(x, (bits + (rbits.to(tl.uint32, bitcast=True) >> 16)) >> 16)


@triton.jit
def sr_to_fp16(x, seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """Stochastic rounding of fp32 block x to fp16 with random words keyed by (seed, element offsets)."""
    return round_fp16_sr(x, random_words(seed, offsets, N_ROUNDS))


@triton.jit
def sr_to_bf16(x, seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """Stochastic rounding of fp32 block x to bf16 with random words keyed by (seed, element offsets)."""
    return round_bf16_sr(x, random_words(seed, offsets, N_ROUNDS))


# ------------------------------------------------------------------------------ per-row scales

@triton.jit
def _max_nan(a, b):
    # NaN-propagating max (one instruction on sm_90): a row's NaN reaches its amax without a select
    # per element
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_scale(x, QMAX: tl.constexpr):
    """Decode scale per row of a 2-D fp32 block x (M, N), reducing over axis 1 (N).
    Returns (scale, scale_inv), both (M,) fp32: with a = QMAX for all-zero rows (scale 1), else
    max(amax, 2**-100): scale = a / QMAX, scale_inv = QMAX / a. NaN counts as inf (-> scale inf,
    scale_inv 0). Padding lanes of x must hold 0 (e.g. tl.where(mask, x, 0.0))."""
    amax = tl.reduce(tl.abs(x), 1, _max_nan)
    amax = tl.where(amax == amax, amax, float("inf"))
    qmax = tl.full(amax.shape, QMAX, tl.float32)
    amax = tl.where(amax == 0.0, qmax, tl.maximum(amax, AMAX_FLOOR))
    return tl.math.div_rn(amax, qmax), tl.math.div_rn(qmax, amax)


@triton.jit
def _scaled(x, scale_inv, QMAX: tl.constexpr, CLAMP: tl.constexpr = True):
    """x * scale_inv with NaN -> 0, clamped to [-QMAX, QMAX]. With the row's own scale, |v| exceeds
    QMAX by at most one ulp (two roundings of at most half an ulp each), which round-to-nearest of the
    integer grids and the saturating fp8 cast bring back to QMAX: those callers skip the clamp (CLAMP
    False), and NaN can only come from a poisoned row, the one row kind whose scale_inv is 0 (finite
    rows have scale_inv >= QMAX / max finite fp32): its values are zeroed by a select on the row's
    scale_inv, which the compiler evaluates once per row, not a NaN test per element."""
    v = x * scale_inv
    if CLAMP:
        v = tl.where(v == v, v, 0.0)
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    else:
        v = tl.where(scale_inv == 0.0, 0.0, v)
    return v


@triton.jit
def _to_int(x, scale_inv, rbits, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr, CLAMP: tl.constexpr = True):
    """The integer grids (spacing 1 up to QMAX < 2**22) from a few float operations: the same codes as
    _grid_round on (MANT_BITS, EMIN) = (7, 7) or (15, 15), at a fraction of its integer work.
    RN: adding 1.5 * 2**23 leaves |v| <= QMAX rounded to an integer (IEEE nearest even, exact
    otherwise), read back from the low bits of the sum. SR: k = floor(|v|) and frac = |v| - k are exact
    in fp32, frac * 2**32 is exact and its truncation is floor(frac * 2**32), the grid's frac32."""
    v = _scaled(x, scale_inv, QMAX, CLAMP or STOCHASTIC)
    if STOCHASTIC:
        a = tl.abs(v)
        k = tl.floor(a)
        frac32 = ((a - k) * 4294967296.0).to(tl.uint32)
        up = rbits.to(tl.uint32, bitcast=True) > (frac32 ^ 0xFFFFFFFF)        # r + frac32 >= 2**32
        mag = k.to(tl.int32) + up.to(tl.int32)
        q = tl.where(v < 0.0, -mag, mag)
    else:
        # the sum must be rounded on its own: contracted with the scaling multiply into one FMA (which
        # the compiler may do across the NaN select) it would round x * scale_inv + 1.5 * 2**23 once
        if COMPILED:
            t = libdevice.add_rn(v, 12582912.0)
        else:
            t = v + 12582912.0
        q = t.to(tl.int32, bitcast=True) - 0x4B400000
    return q


@triton.jit
def _to_fp8(x, scale_inv, rbits, STOCHASTIC: tl.constexpr, CLAMP: tl.constexpr = True):
    if not STOCHASTIC and COMPILED:
        v = _scaled(x, scale_inv, 448.0, CLAMP)
        # v is finite and inside [-448, 448]: sm_90's cvt.rn.satfinite rounds it to nearest even,
        # the same bits as the grid below (checked by the GPU suite), in one instruction per pair
        q = v.to(tl.float8e4nv)
    else:
        sign, code = _grid_round(_scaled(x, scale_inv, 448.0), rbits, 3, -6, STOCHASTIC)
        q = ((sign >> 24) | code).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return q


# ------------------------------------------------------------------------------ int8 / fp8 / int16

@triton.jit
def quantize_int8_rn(x, scale_inv):
    """fp32 block x, scale_inv broadcastable to x (e.g. scale_inv[:, None]) -> int8 codes, nearest even."""
    return quantize(x, scale_inv, x, 0, False)


@triton.jit
def quantize_int8_sr(x, scale_inv, rbits):
    """fp32 block x -> int8 codes, stochastic rounding with uint32 random words rbits."""
    return quantize(x, scale_inv, rbits, 0, True)


@triton.jit
def quantize_int16_rn(x, scale_inv):
    """fp32 block x -> int16 codes (QMAX 32767), nearest even."""
    return quantize(x, scale_inv, x, 2, False)


@triton.jit
def quantize_int16_sr(x, scale_inv, rbits):
    """fp32 block x -> int16 codes (QMAX 32767), stochastic rounding."""
    return quantize(x, scale_inv, rbits, 2, True)


@triton.jit
def quantize_fp8_rn(x, scale_inv):
    """fp32 block x -> float8 e4m3fn codes (QMAX 448), nearest even (the same bits compiled and
    interpreted)."""
    return quantize(x, scale_inv, x, 1, False)


@triton.jit
def quantize_fp8_sr(x, scale_inv, rbits):
    """fp32 block x -> float8 e4m3fn codes, stochastic rounding between the two e4m3 neighbours."""
    return quantize(x, scale_inv, rbits, 1, True)


@triton.jit
def round_half(x, rbits, FMT: tl.constexpr, STOCHASTIC: tl.constexpr):
    """x (fp32 block) rounded to FMT (0 fp16, 1 bf16); rbits (uint32 words) read only when STOCHASTIC."""
    if FMT == 0:
        y = round_fp16_sr(x, rbits) if STOCHASTIC else round_fp16_rn(x)
    else:
        y = round_bf16_sr(x, rbits) if STOCHASTIC else round_bf16_rn(x)
    return y


@triton.jit
def quantize(x, scale_inv, rbits, FMT: tl.constexpr, STOCHASTIC: tl.constexpr, OWN_SCALE: tl.constexpr = False):
    """Codes of format FMT (0 int8, 1 fp8 e4m3fn, 2 int16) of the fp32 block x; rbits (uint32 words)
    are read only when STOCHASTIC. OWN_SCALE: scale_inv is x's own row_scale, so round-to-nearest
    needs no clamp and zeroes a poisoned row by its scale_inv (see _scaled); the codes are the same."""
    if FMT == 1:
        q = _to_fp8(x, scale_inv, rbits, STOCHASTIC, not OWN_SCALE)
    else:
        q = _to_int(x, scale_inv, rbits, 127.0 if FMT == 0 else 32767.0, STOCHASTIC, not OWN_SCALE)
        q = q.to(tl.int8) if FMT == 0 else q.to(tl.int16)
    return q


@triton.jit
def sr_to_int8(x, scale_inv, seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """quantize_int8_sr with random words keyed by (seed, element offsets)."""
    return quantize_int8_sr(x, scale_inv, random_words(seed, offsets, N_ROUNDS))


@triton.jit
def sr_to_fp8(x, scale_inv, seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """quantize_fp8_sr with random words keyed by (seed, element offsets)."""
    return quantize_fp8_sr(x, scale_inv, random_words(seed, offsets, N_ROUNDS))


@triton.jit
def sr_to_int16(x, scale_inv, seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """quantize_int16_sr with random words keyed by (seed, element offsets)."""
    return quantize_int16_sr(x, scale_inv, random_words(seed, offsets, N_ROUNDS))


@triton.jit
def dequantize(codes, scale):
    """codes (int8 / int16 / fp8 e4m3fn block) * scale (broadcastable, fp32) -> fp32."""
    return codes.to(tl.float32) * scale
