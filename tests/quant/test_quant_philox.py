"""Philox4x32 random words: reference against published answers, kernels bit-exact against the
reference (64-bit seeds and offsets, round counts), no stream collisions above 2**32, determinism."""
import numpy as np
import pytest
import torch
import triton

from specssm.quant import ops
from specssm.quant.reference import philox4x32_ref, random_words_ref
from tests.helpers.quant import (
    DEVICE,
    randint4x_kernel,
    run_philox_raw,
    u32,
    words_2d_kernel,
)

# Known-answer vectors of the Random123 distribution (kat_vectors, philox4x32_7 / philox4x32_10):
# (rounds, counter, key, expected output)
KAT = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

SEEDS = [0, 1, -1, 0x0123456789ABCDEF, (1 << 63) + 5, 2**32 + 7]
BIG_OFFSETS = np.array([0, 1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**32 - 4, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 2,
                        2**34, 2**34 + 3, 2**40 + 9, 2**62 - 1, 2**62 + 6, 2**63 - 1], dtype=np.int64)


@pytest.mark.parametrize("rounds, counter, key, expected", KAT)
def test_reference_known_answers(rounds, counter, key, expected):
    got = philox4x32_ref(*counter, *key, n_rounds=rounds)
    assert tuple(int(w) for w in got) == expected


@pytest.mark.parametrize("n_rounds", [1, 7, 10])
def test_kernel_philox_matches_reference(n_rounds):
    rng = np.random.default_rng(n_rounds)
    n = 3000
    c = rng.integers(0, 2**32, size=(4, n), dtype=np.uint64).astype(np.uint32)
    k = rng.integers(0, 2**32, size=(2, n), dtype=np.uint64).astype(np.uint32)
    c[:, :4] = np.array([kat[1] for kat in KAT], dtype=np.uint32).T
    k[:, :4] = np.array([kat[2] for kat in KAT], dtype=np.uint32).T
    got = run_philox_raw(c, k, n_rounds)
    ref = np.stack(philox4x32_ref(c[0], c[1], c[2], c[3], k[0], k[1], n_rounds))
    np.testing.assert_array_equal(got, ref)
    if n_rounds == 10:
        assert tuple(got[:, 2]) == KAT[2][3]


@pytest.mark.parametrize("seed", [0, -1, 0x0123456789ABCDEF])
def test_triton_randint4x_is_the_same_generator(seed):
    """Third implementation: tl.randint4x(seed, int64 offset) = Philox(counter (lo, hi, 0, 0),
    key (seed lo, seed hi)); our words at offset 4c are word 0 of the counter c."""
    offs = BIG_OFFSETS[BIG_OFFSETS < 2**62] // 4
    out = torch.empty((4, offs.size), dtype=torch.int32, device=DEVICE)
    randint4x_kernel[(1,)](torch.from_numpy(offs).to(DEVICE), out, seed, offs.size, N_ROUNDS=10, BLOCK=32)
    s = seed % (1 << 64)
    u = offs.astype(np.uint64)
    ref = np.stack(philox4x32_ref(u & np.uint64(0xFFFFFFFF), u >> np.uint64(32), 0, 0, s & 0xFFFFFFFF, s >> 32))
    np.testing.assert_array_equal(u32(out), ref)
    for lane in range(4):
        np.testing.assert_array_equal(random_words_ref(seed, offs * 4 + lane), ref[lane])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_rounds", [7, 10])
def test_random_words_kernel_matches_reference(seed, n_rounds):
    offs = np.concatenate([BIG_OFFSETS, np.arange(2**32 - 200, 2**32 + 200), np.arange(1000)])
    got = u32(ops.random_words(seed, torch.from_numpy(offs).to(DEVICE), n_rounds=n_rounds))
    np.testing.assert_array_equal(got, random_words_ref(seed, offs, n_rounds))


@pytest.mark.parametrize("per_row_seed", [False, True])
@pytest.mark.parametrize("rowwise", [False, True])
def test_random_words_rows_equals_elementwise(per_row_seed, rowwise):
    """random_words_rows (one Philox per 4 elements) gives the same bits as random_words."""
    M, BN = 9, 32
    row_off = np.array([0, 32, 4, 2**32 - 16, 2**32, 2**34 + 64, 2**40, 2**62, 12], dtype=np.int64)
    seeds = np.array([0, 1, -1, 5, 2**40, -(2**62), 77, 3, 2**32], dtype=np.int64)
    if not per_row_seed:
        seeds = seeds[:1].copy()
    out = torch.zeros((M, BN), dtype=torch.int32, device=DEVICE)
    words_2d_kernel[(triton.cdiv(M, 4),)](torch.from_numpy(row_off).to(DEVICE), torch.from_numpy(seeds).to(DEVICE),
                                          out, M, PER_ROW_SEED=per_row_seed, ROWWISE=rowwise, N_ROUNDS=10,
                                          BLOCK_M=4, BLOCK_N=BN)
    got = u32(out)
    for m in range(M):
        s = int(seeds[m] if per_row_seed else seeds[0])
        np.testing.assert_array_equal(got[m], random_words_ref(s, row_off[m] + np.arange(BN)), err_msg=f"row {m}")


def test_offsets_beyond_2_32_do_not_collide():
    """Offsets o and o + 2**32 (or + 2**34, + 2**62) must give independent words: the high offset bits
    reach the counter. (A generator keyed by 32-bit offsets would repeat the stream exactly.)"""
    n = 1 << 16
    base = np.arange(n, dtype=np.int64)
    streams = [random_words_ref(7, base + shift) for shift in (0, 2**32, 2**34, 2**35, 2**62)]
    for i in range(len(streams)):
        for j in range(i):
            # equal words by chance: expected n / 2**32 ~ 1.5e-5
            assert int((streams[i] == streams[j]).sum()) <= 2
    # and the kernel agrees on a few of them
    got = u32(ops.random_words(7, torch.from_numpy(base[:4096] + 2**34).to(DEVICE)))
    np.testing.assert_array_equal(got, streams[2][:4096])


def test_determinism_and_seed_sensitivity():
    offs = torch.arange(1 << 14, dtype=torch.int64, device=DEVICE) + 2**33
    a = u32(ops.random_words(1234, offs))
    b = u32(ops.random_words(1234, offs))
    np.testing.assert_array_equal(a, b)
    for other in (1235, 1234 + 2**32, 1234 - 2**63):      # low key word, high key word, top bit
        c = u32(ops.random_words(other, offs))
        assert (a == c).mean() < 1e-3
    d = u32(ops.random_words(1234, offs, n_rounds=7))
    assert (a == d).mean() < 1e-3


def test_reference_words_look_uniform():
    """Cheap sanity check of the stream (1M words): every bit is set half of the time and the top
    byte is uniform (chi-square, 255 degrees of freedom)."""
    w = random_words_ref(99, np.arange(1 << 20, dtype=np.int64))
    bits = ((w[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / np.sqrt(w.size))
    counts = np.bincount((w >> 24).astype(np.int64), minlength=256)
    expected = w.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 6 * np.sqrt(2 * 255)


def test_launcher_argument_errors():
    offs = torch.arange(8, dtype=torch.int64)
    with pytest.raises(TypeError, match="seed"):
        ops.random_words(1.5, offs)
    with pytest.raises(ValueError, match="seed"):
        ops.random_words(1 << 64, offs)
    with pytest.raises(TypeError, match="offsets"):
        ops.random_words(0, offs.to(torch.int32))
    with pytest.raises(ValueError, match="n_rounds"):
        ops.random_words(0, offs, n_rounds=0)
    with pytest.raises(ValueError, match="offsets"):
        random_words_ref(0, np.array([-1]))
