"""Round-to-nearest and stochastic rounding of fp32 to fp16 / bf16: the reference is unbiased and
lands on grid neighbours; the Triton device functions reproduce it bit for bit (special values,
overflow, subnormals, edge random words); round-to-nearest equals torch's cast."""
import numpy as np
import pytest
import torch

from specssm.quant import ops
from specssm.quant.reference import (
    grid_values,
    neighbours_ref,
    random_words_ref,
    round_rn_ref,
    round_sr_ref,
)
from tests.helpers.quant import (
    BF16_MAX,
    DEVICE,
    assert_same_bits,
    run_round_words,
    special_values,
    spread_values,
    sr_seeded_kernel,
    unbiased_z,
)
from tests.helpers.quant import (
    ROUND_EDGE_WORDS as EDGE_WORDS,
)

DTYPES = [torch.float16, torch.bfloat16]


# ------------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_sr_neighbours_and_unbiased_1m(dtype):
    n = 1 << 20
    x = spread_values(n, dtype, seed=1)
    words = random_words_ref(11, np.arange(n, dtype=np.int64))
    y = round_sr_ref(x, words, dtype).to(torch.float64)
    lo, hi = neighbours_ref(x, dtype)
    assert bool(((y == lo) | (y == hi)).all())
    s, sd = unbiased_z(x, y, lo, hi)
    assert abs(s) <= 4 * sd, (s, sd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_sr_single_value_unbiased_1m(dtype):
    """One value repeated 1M times: the mean of the rounded values is the value."""
    n = 1 << 20
    for v in (1 / 3, -(2.0 ** -20) * 1.7):
        x = torch.full((n,), v, dtype=torch.float32)
        y = round_sr_ref(x, random_words_ref(3, np.arange(n, dtype=np.int64)), dtype).to(torch.float64)
        lo, hi = neighbours_ref(x[:1], dtype)
        p = float((x[0].double() - lo) / (hi - lo))
        se = float(hi - lo) * np.sqrt(p * (1 - p) / n)
        assert abs(float(y.mean()) - float(x[0])) <= 4 * se


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_sr_exact_expectation(dtype):
    """For grids that use at most 16 random bits the expectation is exact: averaging over all 2**16
    values of the top half of the random word gives back x exactly."""
    xs = [1 / 3, -1.2345678, 1000.1, 3.0e-3] + ([2.0 ** -20 * 1.37] if dtype == torch.bfloat16 else [])
    r = (np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)).astype(np.uint32)
    for v in xs:
        x = torch.full((1 << 16,), v, dtype=torch.float32)
        y = round_sr_ref(x, r, dtype).to(torch.float64)
        assert float(y.sum()) / (1 << 16) == float(x[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rn_within_half_step(dtype):
    x = spread_values(1 << 16, dtype, seed=2)
    y = round_rn_ref(x, dtype).to(torch.float64)
    lo, hi = neighbours_ref(x, dtype)
    assert bool(((y == lo) | (y == hi)).all())
    assert bool(((y - x.double()).abs() <= (hi - lo) / 2).all())


# ------------------------------------------------------------------------------------ kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_kernel_special_values_and_edge_words(dtype, stochastic):
    """Every special value with every edge random word: bit-exact with the reference."""
    xs = special_values(dtype)
    x = xs[:, None].expand(-1, len(EDGE_WORDS)).contiguous()
    words = np.broadcast_to(np.array(EDGE_WORDS, dtype=np.uint32), x.shape).copy()
    got = run_round_words(x, words, dtype, stochastic)
    ref = round_sr_ref(x, words, dtype) if stochastic else round_rn_ref(x, dtype)
    assert_same_bits(got, ref)


def test_overflow_convention():
    """Finite values above the largest finite value: SR picks the largest finite value or inf; RN as torch."""
    x = torch.tensor([65519.0, 65535.0, 70000.0, -65519.0], dtype=torch.float32)
    lo = run_round_words(x, np.zeros(4, np.uint32), torch.float16, True)
    hi = run_round_words(x, np.full(4, 0xFFFFFFFF, np.uint32), torch.float16, True)
    assert lo.tolist() == [65504.0, 65504.0, float("inf"), -65504.0]
    assert hi.tolist() == [float("inf"), float("inf"), float("inf"), -float("inf")]
    b = torch.tensor([BF16_MAX * (1 + 2.0 ** -9)], dtype=torch.float32)
    assert run_round_words(b, np.zeros(1, np.uint32), torch.bfloat16, True).item() == BF16_MAX
    assert run_round_words(b, np.full(1, 0xFFFFFFFF, np.uint32), torch.bfloat16, True).item() == float("inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rowwise", [False, True])
def test_round_to_sr_matches_reference(dtype, rowwise):
    """Launcher with seeded Philox words (offsets above 2**32), 2-D blocks, both random-word paths."""
    x = spread_values(96 * 128, dtype, seed=5).reshape(96, 128)
    offset = 2**32 + 4096
    got = ops.round_to(x.to(DEVICE), dtype, stochastic=True, seed=-42, offset=offset, rowwise=rowwise)
    words = random_words_ref(-42, offset + np.arange(x.numel(), dtype=np.int64)).reshape(x.shape)
    assert_same_bits(got, round_sr_ref(x, words, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_to_rn_matches_torch_cast(dtype):
    x = torch.cat([special_values(dtype), spread_values(6000, dtype, seed=6)])
    x = x[: (x.numel() // 6) * 6].reshape(-1, 6)          # row length not a power of 2
    got = ops.round_to(x.to(DEVICE), dtype)
    assert_same_bits(got, x.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_sr_unbiased(dtype):
    """Triton path, 256K draws: neighbours, unbiased within 4 standard errors, equal to the reference."""
    n = 1 << 18
    x = spread_values(n, dtype, seed=8).reshape(-1, 256)
    got = ops.round_to(x.to(DEVICE), dtype, stochastic=True, seed=8).cpu()
    y = got.to(torch.float64)
    lo, hi = neighbours_ref(x, dtype)
    assert bool(((y == lo) | (y == hi)).all())
    s, sd = unbiased_z(x, y, lo, hi)
    assert abs(s) <= 4 * sd
    words = random_words_ref(8, np.arange(n, dtype=np.int64)).reshape(x.shape)
    assert_same_bits(got, round_sr_ref(x, words, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sr_determinism(dtype):
    x = spread_values(64 * 64, dtype, seed=9).reshape(64, 64).to(DEVICE)
    a = ops.round_to(x, dtype, stochastic=True, seed=17)
    b = ops.round_to(x, dtype, stochastic=True, seed=17)
    c = ops.round_to(x, dtype, stochastic=True, seed=18)
    assert_same_bits(a, b)
    assert not torch.equal(a.cpu(), c.cpu())


@pytest.mark.parametrize("target", [0, 1])
def test_seeded_convenience_wrappers(target):
    """sr_to_fp16 / sr_to_bf16(x, seed, offsets) = SR with random_words(seed, offsets)."""
    dtype = (torch.float16, torch.bfloat16)[target]
    n = 1000
    x = spread_values(n, dtype, seed=10)
    out = torch.empty(n, dtype=dtype, device=DEVICE)
    sr_seeded_kernel[(1,)](x.to(DEVICE), torch.ones(1, device=DEVICE), out, 2**40 + 3, 2**33 + 1, n,
                           TARGET=target, BLOCK=1024)
    words = random_words_ref(2**40 + 3, 2**33 + 1 + np.arange(n, dtype=np.int64))
    assert_same_bits(out, round_sr_ref(x, words, dtype))


def test_grid_tables():
    """Sanity of the search tables that the neighbour checks rely on."""
    g16 = grid_values(torch.float16)
    assert g16[1].item() == -65504.0 and g16[-2].item() == 65504.0 and len(g16) == 2 * 31744 - 1 + 2
    gbf = grid_values(torch.bfloat16)
    assert gbf[-2].item() == BF16_MAX


def test_round_to_argument_errors():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="dtype"):
        ops.round_to(x, torch.int8)
    with pytest.raises(TypeError, match="x"):
        ops.round_to(x.double(), torch.float16)
    with pytest.raises(ValueError, match="offset"):
        ops.round_to(x, torch.float16, stochastic=True, offset=-1)
    with pytest.raises(ValueError, match="rowwise"):
        ops.round_to(x, torch.float16, stochastic=True, offset=2, rowwise=True)
