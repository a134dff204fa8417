"""For the tests in tests/quant: small Triton kernels driving the device functions with explicit
counters, keys and random words, bit comparisons, and the test values the CPU and GPU tests share."""
import numpy as np
import torch
import triton
import triton.language as tl

from specssm._runtime import kernels_interpreted
from specssm.quant.philox import philox4x32, random_words, random_words_rows
from specssm.quant.rounding import (
    quantize,
    round_half,
    sr_to_bf16,
    sr_to_fp8,
    sr_to_fp16,
    sr_to_int8,
)

INTERPRETING = kernels_interpreted()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"


def u32(t: torch.Tensor) -> np.ndarray:
    """int32 tensor holding uint32 bits -> numpy uint32."""
    return t.cpu().numpy().view(np.uint32)


def as_i32(a) -> torch.Tensor:
    """numpy uint32 words -> int32 tensor with the same bits."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, dtype=np.uint32)).view(np.int32))


# ------------------------------------------------------------------------------------ Philox

@triton.jit
def philox_raw_kernel(c_ptr, k_ptr, out_ptr, n, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """c: (4, n) int32 counter words, k: (2, n) key words -> out (4, n)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    c0 = tl.load(c_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 2 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 3 * n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    k0 = tl.load(k_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    k1 = tl.load(k_ptr + n + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS)
    tl.store(out_ptr + i, w0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + n + i, w1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 2 * n + i, w2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 3 * n + i, w3.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def randint4x_kernel(off_ptr, out_ptr, seed, n, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """Triton's own tl.randint4x(seed, int64 offsets) -> out (4, n)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    off = tl.load(off_ptr + i, mask=m, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, off, N_ROUNDS)
    tl.store(out_ptr + i, w0.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + n + i, w1.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 2 * n + i, w2.to(tl.int32, bitcast=True), mask=m)
    tl.store(out_ptr + 3 * n + i, w3.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def words_2d_kernel(row_off_ptr, seed_ptr, out_ptr, M, PER_ROW_SEED: tl.constexpr, ROWWISE: tl.constexpr,
                    N_ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out (M, BLOCK_N) int32: words of offsets row_off[m] + n, seeds per row or seed_ptr[0]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rm = rows < M
    row_off = tl.load(row_off_ptr + rows, mask=rm, other=0)
    if PER_ROW_SEED:
        seed = tl.load(seed_ptr + rows, mask=rm, other=0)
    else:
        seed = tl.load(seed_ptr)
    if ROWWISE:
        w = random_words_rows(seed, row_off, BLOCK_N, N_ROUNDS)
    else:
        if PER_ROW_SEED:
            seed = seed[:, None]
        w = random_words(seed, row_off[:, None] + cols[None, :], N_ROUNDS)
    tl.store(out_ptr + rows[:, None] * BLOCK_N + cols[None, :], w.to(tl.int32, bitcast=True), mask=rm[:, None])


# ------------------------------------------------------------------------------------ rounding

@triton.jit
def round_words_kernel(x_ptr, w_ptr, out_ptr, n, TARGET: tl.constexpr, STOCHASTIC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """1-D: out = round(x) to fp16 (TARGET 0) / bf16 (1) with explicit random words w (int32 bits)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    r = tl.load(w_ptr + i, mask=m, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, round_half(x, r, TARGET, STOCHASTIC), mask=m)


@triton.jit
def quant_words_kernel(x_ptr, sinv_ptr, w_ptr, out_ptr, M, N: tl.constexpr, TARGET: tl.constexpr,
                       STOCHASTIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """2-D: codes of x (M, N) with a given scale_inv (M,) and explicit random words (M, N).
    TARGET 0 int8, 1 fp8 e4m3, 2 int16."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    m = (rows[:, None] < M) & (cols[None, :] < N)
    idx = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + idx, mask=m, other=0.0)
    si = tl.load(sinv_ptr + rows, mask=rows < M, other=1.0)[:, None]
    r = tl.load(w_ptr + idx, mask=m, other=0).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + idx, quantize(x, si, r, TARGET, STOCHASTIC), mask=m)


@triton.jit
def sr_seeded_kernel(x_ptr, sinv_ptr, out_ptr, seed, base, n, TARGET: tl.constexpr, BLOCK: tl.constexpr):
    """1-D convenience wrappers sr_to_*(x, [scale_inv,] seed, offsets): offsets base + i.
    TARGET 0 fp16, 1 bf16, 2 int8, 3 fp8."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m, other=0.0)
    si = tl.load(sinv_ptr)
    offs = base + i.to(tl.int64)
    if TARGET == 0:
        y = sr_to_fp16(x, seed, offs)
    elif TARGET == 1:
        y = sr_to_bf16(x, seed, offs)
    elif TARGET == 2:
        y = sr_to_int8(x, si, seed, offs)
    else:
        y = sr_to_fp8(x, si, seed, offs)
    tl.store(out_ptr + i, y, mask=m)


def run_philox_raw(c: np.ndarray, k: np.ndarray, n_rounds: int, device=DEVICE) -> np.ndarray:
    n = c.shape[1]
    out = torch.empty((4, n), dtype=torch.int32, device=device)
    block = 1024
    philox_raw_kernel[(triton.cdiv(n, block),)](as_i32(c).to(device), as_i32(k).to(device), out, n,
                                                N_ROUNDS=n_rounds, BLOCK=block)
    return u32(out)


def run_round_words(x: torch.Tensor, words: np.ndarray, dtype, stochastic: bool, device=DEVICE) -> torch.Tensor:
    n = x.numel()
    out = torch.empty(n, dtype=dtype, device=device)
    block = 4096 if INTERPRETING or device == "cpu" else 1024
    round_words_kernel[(triton.cdiv(n, block),)](
        x.reshape(-1).to(device), as_i32(words.reshape(-1)).to(device), out, n,
        TARGET=0 if dtype == torch.float16 else 1, STOCHASTIC=stochastic, BLOCK=block)
    return out.reshape(x.shape).cpu()


def run_quant_words(x: torch.Tensor, scale_inv: torch.Tensor, words, dtype, stochastic: bool,
                    device=DEVICE) -> torch.Tensor:
    M, N = x.shape
    out = torch.empty((M, N), dtype=dtype, device=device)
    if words is None:
        words = np.zeros((M, N), dtype=np.uint32)
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(triton.next_power_of_2(M), 4096 // block_n))
    target = {torch.int8: 0, torch.float8_e4m3fn: 1, torch.int16: 2}[dtype]
    quant_words_kernel[(triton.cdiv(M, block_m),)](
        x.to(device), scale_inv.to(device), as_i32(words).to(device), out, M, N=N, TARGET=target,
        STOCHASTIC=stochastic, BLOCK_M=block_m, BLOCK_N=block_n)
    return out.cpu()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor (for bit-exact comparison)."""
    t = t.cpu()
    view = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
            torch.float32: torch.int32}.get(t.dtype)
    return t.view(view) if view is not None else t


def assert_same_bits(got: torch.Tensor, ref: torch.Tensor):
    """Bit equality, except that any NaN matches any NaN."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    got, ref = got.cpu(), ref.cpu()
    if got.dtype.is_floating_point:
        gn, rn = torch.isnan(got.float()), torch.isnan(ref.float())
        assert torch.equal(gn, rn), f"NaN positions differ: {int((gn != rn).sum())}"
        gb, rb = bits(got)[~gn], bits(ref)[~rn]
    else:
        gb, rb = got, ref
    bad = gb != rb
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements differ; first (flat {i}): got bits "
                             f"{int(gb.reshape(-1)[i])}, expected {int(rb.reshape(-1)[i])}")


def unbiased_z(v: torch.Tensor, result: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Sum of residuals in grid steps and its standard deviation under exact SR: (sum z, sqrt(sum p(1-p)))."""
    v, result, lo, hi = (t.to(torch.float64).reshape(-1) for t in (v, result, lo, hi))
    step = hi - lo
    inside = step > 0
    p = torch.where(inside, (v - lo) / torch.where(inside, step, 1.0), 0.0)
    z = torch.where(inside, (result - v) / torch.where(inside, step, 1.0), 0.0)
    return float(z.sum()), float(torch.sqrt((p * (1 - p)).sum()))


# ------------------------------------------------------------------------------------ test values
# shared by the CPU tests (tests/quant/test_quant_rounding.py, test_quant_scaled.py) and the GPU ones

F16_MAX, BF16_MAX = 65504.0, float(torch.finfo(torch.bfloat16).max)


def spread_values(n: int, dtype, seed: int) -> torch.Tensor:
    """fp32 values of both signs over the whole finite range of dtype (incl. its subnormals and values
    below its smallest subnormal), kept below the largest finite value so both neighbours are finite."""
    g = torch.Generator().manual_seed(seed)
    lo_exp, hi_exp = (-30, 15) if dtype == torch.float16 else (-136, 126)
    e = torch.randint(lo_exp, hi_exp + 1, (n,), generator=g).to(torch.float64)
    m = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (s * m * torch.exp2(e)).to(torch.float32)
    top = F16_MAX if dtype == torch.float16 else BF16_MAX
    return torch.clamp(x, -top, top)


def special_values(dtype) -> torch.Tensor:
    f32 = torch.finfo(torch.float32)
    vals = [0.0, -0.0, 1.0, -1.0, 1 / 3, -2 / 3, 2.0 ** -149, -(2.0 ** -149), 2.0 ** -126, 1.5 * 2.0 ** -140,
            f32.max, -f32.max, float("inf"), -float("inf"), float("nan"), 1e30, -1e-30, 0.999999, 1.0000001,
            # ties for round-to-nearest-even (fp16: 1 + 2**-11 is half an ulp; bf16: 1 + 2**-8)
            1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8)]
    if dtype == torch.float16:
        vals += [2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -25,
                 2.0 ** -33, 2.0 ** -34, 3 * 2.0 ** -40, 65504.0, 65505.0, 65519.0, 65519.99, 65520.0, 65535.9,
                 65536.0, -65530.0, 1e5, 70000.0]
    else:
        vals += [BF16_MAX, -BF16_MAX, BF16_MAX * (1 + 2.0 ** -10), 3.3961e38, 2.0 ** -133, 2.0 ** -134,
                 3 * 2.0 ** -135]
    return torch.tensor(vals, dtype=torch.float32)


# random words at the edges of the SR thresholds (fp16 / bf16 rounding)
ROUND_EDGE_WORDS = [0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFEFFFF, 0xFFFF0000,
                    0xFFFFFFFE, 0xFFFFFFFF]

FMTS = [("int8", torch.int8), ("fp8", torch.float8_e4m3fn), ("int16", torch.int16)]
FMT_IDS = [f[0] for f in FMTS]


def rows_of_values(R: int, N: int, seed: int) -> torch.Tensor:
    """Rows with magnitudes from 1e-12 to 1e12, heavy tails inside a row, some exact grid hits."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.randint(-40, 40, (R, 1), generator=g).float())
    x = torch.randn(R, N, generator=g) * mag
    x = x * torch.exp2(torch.randint(-12, 1, (R, N), generator=g).float())
    return x.contiguous()


def special_rows(N: int) -> torch.Tensor:
    rows = torch.zeros(10, N)
    rows[1] = -0.0
    rows[2, 0] = 1e-40                    # fp32 subnormal amax
    rows[3, :2] = torch.tensor([3.0e-30, -1.0e-30])
    rows[4] = torch.linspace(-1, 1, N)
    rows[5, N // 2] = -7.0                # a single non-zero
    rows[6] = 3.0e38
    rows[6, 0] = -3.4e38
    rows[7, 0] = float("nan")
    rows[7, 1] = 2.0
    rows[7, 2] = torch.tensor(0x7FC0_0A01, dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    rows[8, N - 1] = float("inf")
    rows[9] = -float("inf")
    return rows


# random words at the edges of the per-row scaled formats (int8 / fp8 / int16)
QUANT_EDGE_WORDS = np.array([0, 1, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFE, 0xFFFFFFFF, 0x12345678],
                            dtype=np.uint32)
