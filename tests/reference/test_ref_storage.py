"""How states are stored: round-to-nearest casts and 8/16-bit codes with a per-row fp32 decode scale.

"Nearest" is checked against the two neighbouring representable values of each stored element (its
bit pattern +- 1), so the tests do not restate the implementation.
"""
import pytest
import torch

from specssm.reference.storage import decode_state, encode_state, is_quantized

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
QMAX = {torch.int8: 127, torch.int16: 32767, torch.float8_e4m3fn: 448.0}
SAME_SIZE_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
                 torch.float8_e4m3fn: torch.int8}


def states(seed=0, shape=(3, 5, 16)):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes over several binades, plus one all-zero row and one row with a single non-zero
    h = torch.randn(*shape, dtype=torch.float64, generator=gen) * torch.exp(
        torch.empty(*shape, dtype=torch.float64).uniform_(-6, 6, generator=gen))
    h[0, 1] = 0.0
    h[1, 2] = 0.0
    h[1, 2, 3] = -2.5
    return h


def neighbours(stored):
    """The representable values one step below and above each element in magnitude (float64)."""
    ity = SAME_SIZE_INT[stored.dtype]
    bits = stored.view(ity)
    out = []
    for step in (-1, 1):
        nb = (bits.to(torch.int64) + step).clamp(torch.iinfo(ity).min, torch.iinfo(ity).max).to(ity)
        v = nb.view(stored.dtype).double()
        out.append(torch.where(torch.isfinite(v), v, torch.full_like(v, float("inf"))))
    return out


def assert_nearest(h, dec, neigh, slack):
    err = (dec - h).abs()
    for nb in neigh:
        assert bool((err <= (nb - h).abs() + slack).all()), "a neighbour is nearer than the stored value"


@pytest.mark.parametrize("dtype", FLOATS)
def test_float_states_round_to_nearest(dtype):
    h = states()
    q, scale = encode_state(h, dtype)
    assert q.dtype == dtype and q.shape == h.shape and scale is None
    dec = decode_state(q)
    assert dec.dtype == torch.float64 and torch.isfinite(dec).all()
    # float64 -> fp32 -> dtype may round twice: allow one fp32 half-ulp
    assert_nearest(h, dec, neighbours(q), h.abs() * 2.0 ** -24)
    assert torch.equal(dec[0, 1], torch.zeros(16, dtype=torch.float64))


def test_float64_state_is_exact():
    h = states()
    q, scale = encode_state(h, torch.float64)
    assert scale is None and torch.equal(q, h) and torch.equal(decode_state(q), h)


def test_float32_state_is_the_fp32_rounding():
    h = states()
    q, _ = encode_state(h, torch.float32)
    assert torch.equal(q, h.float())


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
def test_integer_codes(dtype):
    h = states(1)
    q, scale = encode_state(h, dtype)
    assert is_quantized(dtype) and q.dtype == dtype and q.shape == h.shape
    assert scale.dtype == torch.float32 and scale.shape == h.shape[:-1]
    amax = h.abs().amax(-1)
    live = amax > 0
    # scale = amax over N / qmax (fp32), all-zero rows: scale 1 and codes 0
    assert float(((scale.double() - amax / QMAX[dtype]).abs() / (amax / QMAX[dtype]))[live].max()) <= 2.0 ** -23
    assert torch.equal(scale[~live], torch.ones_like(scale[~live]))
    assert q.abs().max() <= QMAX[dtype]
    dec = decode_state(q, scale)
    assert torch.equal(dec[~live], torch.zeros_like(dec[~live]))
    # error at most half a quantization step, and the code is the nearest one
    step = scale.double()[..., None]
    assert bool(((dec - h).abs() <= step * (0.5 + 1e-9)).all())
    assert_nearest(h, dec, [dec - step, dec + step], step * 1e-9)
    # the largest element of each row gets the largest code
    assert torch.equal(q.abs().amax(-1)[live].long(), torch.full_like(amax[live], QMAX[dtype]).long())


def test_fp8_codes():
    dtype = torch.float8_e4m3fn
    h = states(2)
    q, scale = encode_state(h, dtype)
    assert q.dtype == dtype and scale.dtype == torch.float32 and scale.shape == h.shape[:-1]
    amax = h.abs().amax(-1)
    live = amax > 0
    assert torch.equal(scale[~live], torch.ones_like(scale[~live]))
    codes = q.double()
    assert torch.isfinite(codes).all() and codes.abs().max() <= 448.0
    dec = decode_state(q, scale)
    assert torch.equal(dec[~live], torch.zeros_like(dec[~live]))
    s = scale.double()[..., None]
    # half an e4m3 step: 2^-4 relative for normals, 2^-10 absolute (code units) for subnormals
    bound = (h.abs() * 2.0 ** -4 + s * 2.0 ** -10) * (1 + 1e-9)
    assert bool(((dec - h).abs() <= bound).all())
    assert_nearest(h, dec, [nb * s for nb in neighbours(q)], h.abs() * 2.0 ** -24)


def test_decode_of_float_state_is_exact():
    q = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert torch.equal(decode_state(q), q.double())
    assert not is_quantized(torch.bfloat16) and not is_quantized(torch.float32)


def test_bad_rounding_arguments():
    h = states()
    with pytest.raises(ValueError, match=r"^rounding:"):
        encode_state(h, torch.int8, rounding="nearest")
    with pytest.raises(ValueError, match=r"^rand_bits:"):
        encode_state(h, torch.int8, rounding="sr")


# ---- stochastic rounding (its reference lives in specssm.quant.reference, written elsewhere) ----

def sr_module():
    qref = pytest.importorskip("specssm.quant.reference")
    if not hasattr(qref, "stochastic_round"):
        pytest.skip("specssm.quant.reference.stochastic_round not written yet")
    return qref


def grid(dtype):
    """Every finite value of an 8/16-bit dtype (in code units for the scaled ones), sorted."""
    if dtype in (torch.int8, torch.int16):
        return torch.arange(-QMAX[dtype], QMAX[dtype] + 1, dtype=torch.float64)
    ity = SAME_SIZE_INT[dtype]
    info = torch.iinfo(ity)
    v = torch.arange(info.min, info.max + 1, dtype=torch.int64).to(ity).view(dtype).double()
    return torch.unique(v[torch.isfinite(v)])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.float8_e4m3fn, torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour(dtype):
    """SR stores the grid value just below or just above h / scale, never anything else."""
    sr_module()
    h = states(3)
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2 ** 32, h.shape, dtype=torch.int64, generator=gen)
    q, scale = encode_state(h, dtype, rounding="sr", rand_bits=bits)
    assert q.dtype == dtype and q.shape == h.shape
    v = h if scale is None else h / scale.double()[..., None]
    g = grid(dtype)
    below = g[(torch.searchsorted(g, v, right=True) - 1).clamp(min=0)]
    above = g[torch.searchsorted(g, v).clamp(max=len(g) - 1)]
    codes = q.double()
    assert bool(((codes == below) | (codes == above)).all())
    # and it is random: both neighbours occur where h is not on the grid
    off_grid = below != above
    assert bool((codes == below)[off_grid].any()) and bool((codes == above)[off_grid].any())


def test_stochastic_rounding_is_unbiased():
    sr_module()
    gen = torch.Generator().manual_seed(1)
    v = torch.tensor([[0.3, -7.25, 100.6, 127.0]], dtype=torch.float64)      # amax 127 -> scale 1
    h = v.expand(4096, 4).contiguous()
    bits = torch.randint(0, 2 ** 32, h.shape, dtype=torch.int64, generator=gen)
    q, scale = encode_state(h, torch.int8, rounding="sr", rand_bits=bits)
    mean = decode_state(q, scale).mean(0)
    frac = v[0] - v[0].floor()
    sigma = (frac * (1 - frac) / 4096).sqrt()
    assert bool(((mean - v[0]).abs() <= 5 * sigma + 1e-6).all())
