"""int8 / fp8 e4m3 / int16 quantization with one fp32 decode scale per row: scales, round-to-nearest
error bounds, stochastic rounding on grid neighbours and unbiased, kernels bit-exact with the reference
(including fp8 values that round up across a power of two, where the interpreter's own cast fails)."""
import numpy as np
import pytest
import torch

from specssm.quant import ops
from specssm.quant.reference import (
    FORMATS,
    dequantize_ref,
    grid_values,
    neighbours_ref,
    quantize_ref,
    random_words_ref,
    row_scale_ref,
    scaled_values_ref,
)
from tests.helpers.quant import (
    DEVICE,
    FMT_IDS,
    FMTS,
    assert_same_bits,
    rows_of_values,
    run_quant_words,
    special_rows,
    sr_seeded_kernel,
    unbiased_z,
)
from tests.helpers.quant import (
    QUANT_EDGE_WORDS as EDGE_WORDS,
)


def codes_as_values(codes: torch.Tensor) -> torch.Tensor:
    return codes.cpu().to(torch.float64)


def assert_sr_codes_on_neighbours_unbiased(x, codes, name):
    """SR codes of x are grid neighbours of the scaled values v and unbiased within 4 standard errors.
    Returns (v, lo, hi)."""
    _, scale_inv = row_scale_ref(x, name)
    v = scaled_values_ref(x, scale_inv, name)
    y = codes_as_values(codes)
    lo, hi = neighbours_ref(v, name)
    assert bool(((y == lo) | (y == hi)).all())
    s, sd = unbiased_z(v, y, lo, hi)
    assert abs(s) <= 4 * sd, (s, sd)
    return v, lo, hi


# ------------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
def test_reference_sr_neighbours_and_unbiased_1m(name, dtype):
    x = rows_of_values(8192, 128, seed=1)
    words = random_words_ref(5, np.arange(x.numel(), dtype=np.int64)).reshape(x.shape)
    codes, scale = quantize_ref(x, name, words)
    v, lo, hi = assert_sr_codes_on_neighbours_unbiased(x, codes, name)
    # decoded values are unbiased for x too, up to the fp32 roundings of x * scale_inv, scale_inv and
    # scale (each <= 2**-24 relative): residual in code units against its sd plus that bound
    xs = x.double() / scale.double()[:, None]
    resid = float((codes_as_values(codes) - xs).sum())
    sd_code = float(torch.sqrt(((v.double() - lo) * (hi - v.double())).sum()))
    assert abs(resid) <= 4 * sd_code + float(xs.abs().sum()) * 2.0 ** -22


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_reference_sr_single_value_unbiased_1m(name):
    n = 1 << 20
    qmax = FORMATS[name][2]
    # one row of n copies of v plus qmax (so amax = qmax and scale_inv = 1: v is rounded as is)
    for v in (1 / 3 * 10, -0.07, 300.3 if name == "fp8" else -100.25):
        x = torch.full((1, n), v, dtype=torch.float32)
        x[0, 0] = qmax
        codes, _ = quantize_ref(x, name, random_words_ref(9, np.arange(n, dtype=np.int64)).reshape(1, n))
        y = codes_as_values(codes)[0, 1:]
        lo, hi = neighbours_ref(x[0, 1:2], name)
        p = float((x[0, 1].double() - lo) / (hi - lo))
        se = float(hi - lo) * np.sqrt(p * (1 - p) / (n - 1))
        assert abs(float(y.mean()) - float(x[0, 1])) <= 4 * se


def test_reference_fp8_rn_is_nearest_even_by_search():
    """RN of fp8 against an exhaustive search over all e4m3 values (ties to the even code) and against
    torch's cast: three descriptions agree."""
    g = torch.Generator().manual_seed(3)
    grid = grid_values("fp8")
    mids = (grid[1:] + grid[:-1]) / 2                     # every tie
    v = torch.cat([mids, grid, (torch.rand(20000, generator=g, dtype=torch.float64) * 2 - 1) * 448,
                   torch.tensor([7.94, 15.9, 0.0156, -239.9, 447.9, 2.0 ** -10, 3 * 2.0 ** -11])]).float()
    x = v[None, :]
    codes, _ = quantize_ref(x, "fp8", scale_inv=torch.ones(1), scale=torch.ones(1))
    got = codes_as_values(codes)[0]
    d = (v.double()[:, None] - grid[None, :]).abs()
    best = d.min(dim=1).values
    cand = d == best[:, None]
    code_bits = grid.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    even = (code_bits & 1) == 0
    pick = torch.where(cand.sum(1) > 1, (cand & even[None, :]).float().argmax(1), cand.float().argmax(1))
    assert torch.equal(got, grid[pick])
    assert torch.equal(codes[0].view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))


def test_reference_int_rn_is_torch_round():
    x = rows_of_values(64, 128, seed=4)
    for name in ("int8", "int16"):
        codes, _ = quantize_ref(x, name)
        _, sinv = row_scale_ref(x, name)
        assert torch.equal(codes.to(torch.float64), torch.round(scaled_values_ref(x, sinv, name).double()))


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
def test_reference_rn_error_at_most_half_step(name, dtype):
    x = rows_of_values(512, 128, seed=6)
    codes, scale = quantize_ref(x, name)
    _, sinv = row_scale_ref(x, name)
    v = scaled_values_ref(x, sinv, name).double()
    lo, hi = neighbours_ref(v, name)
    y = codes_as_values(codes)
    assert bool(((y - v).abs() <= (hi - lo) / 2).all())
    # in x's units: half a step plus the fp32 rounding of x * scale_inv and of the scale
    err = (dequantize_ref(codes, scale) - x.double()).abs()
    bound = (hi - lo) / 2 * scale.double()[:, None] + x.double().abs() * 2.0 ** -22
    assert bool((err <= bound).all())


# ------------------------------------------------------------------------------------ scales

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # 0 * inf in the interpreter
@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
def test_scales_and_special_rows(name, dtype, stochastic):
    """Zero, subnormal, huge and poisoned (NaN / inf) rows: scales, codes bit-equal to the reference (a
    poisoned row's codes 0 under either rounding), decoded rows."""
    N = 64
    x = torch.cat([special_rows(N), rows_of_values(6, N, seed=7)])
    codes, scale = ops.quantize_rows(x.to(DEVICE), dtype, stochastic=stochastic, seed=1)
    codes, scale = codes.cpu(), scale.cpu()
    words = random_words_ref(1, np.arange(x.numel())).reshape(x.shape) if stochastic else None
    ref_codes, ref_scale = quantize_ref(x, name, words)
    assert_same_bits(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    finite_rows = torch.isfinite(x).all(dim=1)
    assert bool((scale[finite_rows] > 0).all() and torch.isfinite(scale[finite_rows]).all())
    assert bool((scale[~finite_rows] == float("inf")).all())
    dec = ops.dequantize_rows(codes.to(DEVICE), scale.to(DEVICE)).cpu()
    assert torch.equal(dec[:2], torch.zeros(2, N))                                      # zero rows: exact zeros
    assert scale[:2].tolist() == [1.0, 1.0]                                             # ... with scale 1
    assert bool(torch.isnan(dec[~finite_rows]).all())                                   # poisoned rows: all NaN
    # every element within one grid step of x (tiny rows, amax < 2**-100, sit on the floor's grid)
    sinv = row_scale_ref(x, name)[1]
    lo, hi = neighbours_ref(scaled_values_ref(x, sinv, name), name)
    bound = (hi - lo) * scale.double()[:, None] + x.double().abs() * 2.0 ** -22
    err = (dec.double() - x.double()).abs()
    assert bool((err[finite_rows] <= bound[finite_rows]).all())


# ------------------------------------------------------------------------------------ kernels

SHAPES = [(64, 128), (33, 80), (5, 1), (7, 6), (16, 256), (4, 6, 64)]


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_quantize_rows_matches_reference(name, dtype, stochastic, shape):
    R, N = int(np.prod(shape[:-1])), shape[-1]
    x = rows_of_values(R, N, seed=R * N).reshape(shape)
    offset = 2**33 + 4 * R if N % 4 == 0 else 2**33 + 1
    codes, scale = ops.quantize_rows(x.to(DEVICE), dtype, stochastic=stochastic, seed=2**40 + 5, offset=offset)
    words = (random_words_ref(2**40 + 5, offset + np.arange(x.numel(), dtype=np.int64)).reshape(shape)
             if stochastic else None)
    ref_codes, ref_scale = quantize_ref(x, name, words)
    assert_same_bits(codes, ref_codes)
    assert torch.equal(scale.cpu(), ref_scale)
    if N % 4 == 0 and stochastic:      # the elementwise random-word path gives the same codes
        codes2, _ = ops.quantize_rows(x.to(DEVICE), dtype, stochastic=True, seed=2**40 + 5, offset=offset,
                                      rowwise=False)
        assert_same_bits(codes2, codes)


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
def test_row_max_scaled_above_qmax(name, dtype, stochastic):
    """Rows whose largest element lands one ulp above QMAX after scaling (fl(amax * fl(QMAX / amax)) >
    QMAX): round-to-nearest skips the clamp for a row's own scale and must still give +-QMAX there."""
    qmax = np.float32(FORMATS[name][2])
    g = np.random.default_rng(31)
    amax = (g.uniform(1, 2, 200_000) * np.exp2(g.integers(-20, 20, 200_000))).astype(np.float32)
    over = amax[amax * (qmax / amax) > qmax][:64]
    assert len(over) >= 16                      # such rows exist for every format
    x = torch.from_numpy(over)[:, None] * torch.linspace(-1, 1, 32)[None, :]
    x[1::2] = -x[1::2]                          # the row's max at either sign
    codes, scale = ops.quantize_rows(x.to(DEVICE), dtype, stochastic=stochastic, seed=7, offset=0)
    words = random_words_ref(7, np.arange(x.numel(), dtype=np.int64)).reshape(x.shape) if stochastic else None
    ref_codes, ref_scale = quantize_ref(x, name, words)
    assert_same_bits(codes, ref_codes)
    assert codes_as_values(codes).abs().max(dim=1).values.eq(float(qmax)).all()


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
def test_kernel_edge_values_and_words(name, dtype, stochastic):
    """Given scale_inv = 1: values at and beyond +-QMAX (clamped), ties, powers of two approached from
    below (fp8 7.94 -> 8 is what the interpreter's own fp8 cast gets wrong), subnormal fp8, tiny
    values, NaN / inf, with edge random words."""
    qmax = FORMATS[name][2]
    vals = [0.0, -0.0, 0.5, 1.5, 2.5, -2.5, 0.25, 126.5, 127.0, 127.49, 127.5, -127.7, 128.0, 1e6, -1e30,
            7.94, 15.9, 31.99, 0.0156, 447.9, 448.0, 449.0, 416.0, 432.0, 2.0 ** -9, 1.5 * 2.0 ** -9,
            2.0 ** -10, 2.0 ** -18, 2.0 ** -19, 2.0 ** -33, 2.0 ** -149, 1e-40, float("nan"), float("inf"),
            -float("inf"), qmax, -qmax, qmax - 0.5, 32766.5, 32767.5, 1 / 3, -2 / 3]
    x = torch.tensor(vals, dtype=torch.float32)[:, None].expand(-1, len(EDGE_WORDS)).contiguous()
    words = np.broadcast_to(EDGE_WORDS, x.shape).copy()
    ones = torch.ones(x.shape[0])
    got = run_quant_words(x, ones, words if stochastic else None, dtype, stochastic)
    ref, _ = quantize_ref(x, name, words if stochastic else None, scale_inv=ones, scale=ones)
    assert_same_bits(got, ref)
    if name == "fp8" and not stochastic:
        assert got[vals.index(7.94), 0].float().item() == 8.0
        assert got[vals.index(15.9), 0].float().item() == 16.0


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
def test_kernel_sr_unbiased(name, dtype):
    """Triton path, 256K draws: codes on the neighbours of v, unbiased within 4 standard errors."""
    x = rows_of_values(2048, 128, seed=12)
    codes, _ = ops.quantize_rows(x.to(DEVICE), dtype, stochastic=True, seed=77)
    assert_sr_codes_on_neighbours_unbiased(x, codes, name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
def test_dequantize_rows_matches_reference(name, dtype):
    x = torch.cat([rows_of_values(40, 96, seed=13), special_rows(96)])
    codes, scale = quantize_ref(x, name)
    got = ops.dequantize_rows(codes.to(DEVICE), scale.to(DEVICE)).cpu()
    ref = dequantize_ref(codes, scale).float()            # code * scale is one fp32 rounding of the exact product
    assert_same_bits(got, ref)


@pytest.mark.parametrize("target, name", [(2, "int8"), (3, "fp8")])
def test_seeded_convenience_wrappers(target, name):
    """sr_to_int8 / sr_to_fp8(x, scale_inv, seed, offsets) = SR with random_words(seed, offsets)."""
    n = 2000
    x = rows_of_values(1, n, seed=14)
    _, sinv = row_scale_ref(x, name)
    dtype = torch.int8 if name == "int8" else torch.float8_e4m3fn
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    sr_seeded_kernel[(1,)](x[0].to(DEVICE), sinv.to(DEVICE), out, -3, 2**35, n, TARGET=target, BLOCK=2048)
    words = random_words_ref(-3, 2**35 + np.arange(n, dtype=np.int64))[None, :]
    ref, _ = quantize_ref(x, name, words)
    assert_same_bits(out, ref[0])


def test_quantize_rows_argument_errors():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="dtype"):
        ops.quantize_rows(x, torch.float16)
    with pytest.raises(TypeError, match="x"):
        ops.quantize_rows(x.half(), torch.int8)
    with pytest.raises(ValueError, match="x"):
        ops.quantize_rows(torch.zeros(2, 2048), torch.int8)
    with pytest.raises(ValueError, match="scale"):
        ops.dequantize_rows(torch.zeros(4, 8, dtype=torch.int8), torch.zeros(3))
    with pytest.raises(TypeError, match="codes"):
        ops.dequantize_rows(torch.zeros(4, 8), torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.int16, torch.float16, torch.bfloat16,
                                   torch.float32])
def test_stochastic_round_entry_point(dtype):
    """reference.stochastic_round(v, dtype, rand_bits) (used by specssm/reference/storage.py) rounds
    already-scaled values exactly like the kernels' rule; rand_bits may be int64 holding uint32 words."""
    from specssm.quant.reference import round_sr_ref, stochastic_round
    x = rows_of_values(64, 128, seed=15)
    words = random_words_ref(4, np.arange(x.numel(), dtype=np.int64)).reshape(x.shape)
    bits64 = torch.from_numpy(words.astype(np.int64))
    name = {torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.int16: "int16"}.get(dtype)
    if name is None:
        got = stochastic_round(x, dtype, bits64)
        ref = x if dtype == torch.float32 else round_sr_ref(x, words, dtype)
    else:
        _, sinv = row_scale_ref(x, name)
        got = stochastic_round(x * sinv[:, None], dtype, bits64)
        ref, _ = quantize_ref(x, name, words)
    assert_same_bits(got, ref)


def test_storage_encode_state_uses_this_rule():
    """Smoke test of the lead's reference storage path (skipped if its interface moved)."""
    storage = pytest.importorskip("specssm.reference.storage")
    h = rows_of_values(16, 64, seed=16).double()
    bits = torch.from_numpy(random_words_ref(1, np.arange(h.numel(), dtype=np.int64)).astype(np.int64)).reshape(h.shape)
    try:
        stored, scale = storage.encode_state(h, torch.int8, "sr", bits)
    except TypeError as e:
        pytest.skip(f"storage.encode_state interface changed: {e}")
    v = h / scale.double()[:, None]
    lo, hi = neighbours_ref(v, "int8")
    y = stored.double()
    assert bool(((y == lo) | (y == hi)).all())
