"""On a CUDA GPU (compiled Triton, not the interpreter), >= 1M elements: random words, rounding and
quantization bit-exact with the CPU reference, SR unbiased on the device, fp8 against exact rounding.
Run with `make gpu-test` (pytest -m gpu); skipped without CUDA."""
import numpy as np
import pytest
import torch
import triton

from specssm.quant import ops
from specssm.quant.reference import (
    neighbours_ref,
    philox4x32_ref,
    quantize_ref,
    random_words_ref,
    round_sr_ref,
    row_scale_ref,
    scaled_values_ref,
)
from tests.helpers.quant import (
    FMT_IDS,
    FMTS,
    QUANT_EDGE_WORDS,
    ROUND_EDGE_WORDS,
    assert_same_bits,
    randint4x_kernel,
    rows_of_values,
    run_philox_raw,
    run_quant_words,
    run_round_words,
    special_rows,
    special_values,
    spread_values,
    u32,
    unbiased_z,
    words_2d_kernel,
)

pytestmark = pytest.mark.gpu
DEV = "cuda"
MILLION = 1 << 20


@pytest.mark.parametrize("n_rounds", [7, 10])
def test_gpu_philox_raw_1m(n_rounds):
    rng = np.random.default_rng(n_rounds)
    c = rng.integers(0, 2**32, size=(4, MILLION), dtype=np.uint64).astype(np.uint32)
    k = rng.integers(0, 2**32, size=(2, MILLION), dtype=np.uint64).astype(np.uint32)
    got = run_philox_raw(c, k, n_rounds, device=DEV)
    np.testing.assert_array_equal(got, np.stack(philox4x32_ref(*c, *k, n_rounds)))


@pytest.mark.parametrize("seed", [0, -1, (1 << 63) + 12345])
def test_gpu_random_words_1m_across_2_32(seed):
    offs = np.arange(2**32 - MILLION // 2, 2**32 + MILLION // 2, dtype=np.int64)
    offs[:64] = np.array([2**62 + i for i in range(64)])
    got = u32(ops.random_words(seed, torch.from_numpy(offs).to(DEV)))
    np.testing.assert_array_equal(got, random_words_ref(seed, offs))


def test_gpu_randint4x_parity():
    offs = np.array([0, 1, 2**32 - 1, 2**32, 2**40 + 3, 2**59 + 1], dtype=np.int64)
    out = torch.empty((4, offs.size), dtype=torch.int32, device=DEV)
    randint4x_kernel[(1,)](torch.from_numpy(offs).to(DEV), out, 99, offs.size, N_ROUNDS=10, BLOCK=32)
    for lane in range(4):
        np.testing.assert_array_equal(u32(out)[lane], random_words_ref(99, offs * 4 + lane))


@pytest.mark.parametrize("per_row_seed", [False, True])
def test_gpu_random_words_rows(per_row_seed):
    M, BN = 8192, 128
    row_off = (np.arange(M, dtype=np.int64) * BN + 2**33)
    seeds = np.arange(M, dtype=np.int64) * 7919 - 5 if per_row_seed else np.array([2**45 + 1], dtype=np.int64)
    outs = []
    for rowwise in (False, True):
        out = torch.zeros((M, BN), dtype=torch.int32, device=DEV)
        words_2d_kernel[(triton.cdiv(M, 16),)](torch.from_numpy(row_off).to(DEV), torch.from_numpy(seeds).to(DEV), out,
                                               M, PER_ROW_SEED=per_row_seed, ROWWISE=rowwise, N_ROUNDS=10,
                                               BLOCK_M=16, BLOCK_N=BN)
        outs.append(u32(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    if not per_row_seed:
        ref = random_words_ref(int(seeds[0]), row_off[:, None] + np.arange(BN)[None, :])
        np.testing.assert_array_equal(outs[1], ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rowwise", [False, True])
def test_gpu_round_sr_1m(dtype, rowwise):
    x = spread_values(MILLION, dtype, seed=21).reshape(-1, 128)
    got = ops.round_to(x.to(DEV), dtype, stochastic=True, seed=2024, offset=2**36, rowwise=rowwise).cpu()
    words = random_words_ref(2024, 2**36 + np.arange(MILLION, dtype=np.int64)).reshape(x.shape)
    assert_same_bits(got, round_sr_ref(x, words, dtype))
    y = got.to(torch.float64)
    lo, hi = neighbours_ref(x, dtype)
    assert bool(((y == lo) | (y == hi)).all())
    s, sd = unbiased_z(x, y, lo, hi)
    assert abs(s) <= 4 * sd


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_round_rn_and_special_values(dtype):
    x = spread_values(MILLION, dtype, seed=22).reshape(-1, 256)
    got = ops.round_to(x.to(DEV), dtype).cpu()
    assert_same_bits(got, x.to(dtype))
    assert_same_bits(got, x.to(DEV).to(dtype).cpu())
    xs = special_values(dtype)
    xe = xs[:, None].expand(-1, len(ROUND_EDGE_WORDS)).contiguous()
    words = np.broadcast_to(np.array(ROUND_EDGE_WORDS, dtype=np.uint32), xe.shape).copy()
    for stochastic in (False, True):
        got = run_round_words(xe, words, dtype, stochastic, device=DEV)
        ref = round_sr_ref(xe, words, dtype) if stochastic else xe.to(dtype)
        assert_same_bits(got, ref)


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("rowwise", [False, True])
def test_gpu_quantize_rows_1m(name, dtype, stochastic, rowwise):
    x = torch.cat([rows_of_values(8192 - 10, 128, seed=23), special_rows(128)])
    codes, scale = ops.quantize_rows(x.to(DEV), dtype, stochastic=stochastic, seed=-99, offset=2**34,
                                     rowwise=rowwise)
    codes, scale = codes.cpu(), scale.cpu()
    words = random_words_ref(-99, 2**34 + np.arange(x.numel(), dtype=np.int64)).reshape(x.shape) if stochastic else None
    ref_codes, ref_scale = quantize_ref(x, name, words)
    assert_same_bits(codes, ref_codes)
    assert torch.equal(scale, ref_scale)
    _, sinv = row_scale_ref(x, name)
    v = scaled_values_ref(x, sinv, name)
    if stochastic:
        finite = torch.isfinite(x).all(dim=1)
        y = codes[finite].to(torch.float64)
        lo, hi = neighbours_ref(v[finite], name)
        assert bool(((y == lo) | (y == hi)).all())
        s, sd = unbiased_z(v[finite], y, lo, hi)
        assert abs(s) <= 4 * sd
    elif name == "fp8":
        # exact rounding: torch's RN-even cast of the clamped scaled values, on the CPU and on the device
        assert torch.equal(codes.view(torch.uint8), v.to(torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(codes.view(torch.uint8), v.to(DEV).to(torch.float8_e4m3fn).cpu().view(torch.uint8))


@pytest.mark.parametrize("name, dtype", FMTS, ids=FMT_IDS)
def test_gpu_edge_values_and_dequantize(name, dtype):
    vals = torch.tensor([0.0, -0.0, 0.5, 2.5, 7.94, 15.9, 127.5, 447.9, 448.0, 449.0, 2.0 ** -9, 1.5 * 2.0 ** -9,
                         2.0 ** -19, 1e-40, float("nan"), float("inf"), -float("inf"), 32767.5, 1 / 3],
                        dtype=torch.float32)
    x = vals[:, None].expand(-1, len(QUANT_EDGE_WORDS)).contiguous()
    words = np.broadcast_to(QUANT_EDGE_WORDS, x.shape).copy()
    ones = torch.ones(x.shape[0])
    for stochastic in (False, True):
        got = run_quant_words(x, ones, words if stochastic else None, dtype, stochastic, device=DEV)
        ref, _ = quantize_ref(x, name, words if stochastic else None, scale_inv=ones, scale=ones)
        assert_same_bits(got, ref)
    codes, scale = quantize_ref(rows_of_values(4096, 256, seed=24), name)
    dec = ops.dequantize_rows(codes.to(DEV), scale.to(DEV)).cpu()
    assert_same_bits(dec, (codes.double() * scale.double()[:, None]).float())
