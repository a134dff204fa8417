"""Counter-based random bits for stochastic rounding: Philox4x32 as inlineable Triton device functions.

Philox4x32-R (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a 128-bit counter
(c0, c1, c2, c3) and a 64-bit key (k0, k1), all uint32 words. One round is

    (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0))
    (k0, k1)         <- (k0 + W0, k1 + W1)                                   (mod 2**32)

with M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85 and hi/lo the upper/lower
32 bits of the 64-bit product. Ten rounds are the standard (Crush-resistant) choice; seven pass
BigCrush too and are cheaper. Outputs are the four counter words after the last round.

Random word of an element (the definition every kernel and `reference.random_words_ref` share):

    key     = (seed mod 2**32, (seed >> 32) mod 2**32)        # 64-bit seed, two's complement
    counter = (offset >> 2) as (low 32 bits, high 32 bits, 0, 0)
    word    = output word number (offset & 3) of Philox4x32-R(counter, key)

`offset` is a non-negative 64-bit element offset (e.g. the element's linear index in the state pool).
Four consecutive offsets 4j..4j+3 share one Philox evaluation, so a block whose offsets come in aligned
runs of four can pay one Philox call per four elements (`random_words_rows`). The high half of the
counter carries offset bits 34..63, so pools larger than 2**32 elements never reuse a counter under
the same seed.
"""
import triton
import triton.language as tl

# constexpr globals: a compiled @jit function may only read globals of this kind
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
DEFAULT_ROUNDS = 10


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr = 10):
    """Philox4x32-N_ROUNDS on uint32 blocks (counter words c0..c3, key words k0, k1; blocks or scalars
    that broadcast). Returns the four uint32 output words."""
    for _ in tl.static_range(N_ROUNDS):
        hi0 = tl.umulhi(c0, tl.full((), PHILOX_M0, tl.uint32))
        lo0 = c0 * tl.full((), PHILOX_M0, tl.uint32)
        hi1 = tl.umulhi(c2, tl.full((), PHILOX_M1, tl.uint32))
        lo1 = c2 * tl.full((), PHILOX_M1, tl.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + tl.full((), PHILOX_W0, tl.uint32)
        k1 = k1 + tl.full((), PHILOX_W1, tl.uint32)
    return c0, c1, c2, c3


@triton.jit
def seed_to_key(seed):
    """64-bit seed (any integer scalar or block; int32 is sign-extended) -> Philox key words (k0, k1)."""
    s = (tl.zeros((), tl.int64) + seed).to(tl.int64).to(tl.uint64, bitcast=True)   # also takes a constexpr int
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    return k0, k1


@triton.jit
def _counter_words(offsets):
    """Element offsets (int32/int64 block, >= 0) -> counter words (lo, hi) of offset >> 2, and the lane."""
    off = offsets.to(tl.int64).to(tl.uint64, bitcast=True)
    ctr = off >> 2
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    lane = (off & 3).to(tl.uint32)
    return c0, c1, lane


@triton.jit
def random_words(seed, offsets, N_ROUNDS: tl.constexpr = 10):
    """uint32 random word of each element; `offsets` is a block (any shape) of element offsets >= 0
    (int32 or int64), `seed` a 64-bit integer scalar or a block that broadcasts with `offsets`.
    One Philox evaluation per element (3 of its 4 words are dropped): use `random_words_rows`
    when offsets come in aligned runs of four."""
    c0, c1, lane = _counter_words(offsets)
    k0, k1 = seed_to_key(seed)
    zero = c0 * 0
    w0, w1, w2, w3 = philox4x32(c0, c1, zero, zero, k0, k1, N_ROUNDS)
    return tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))


@triton.jit
def random_words_rows(seed, row_offsets, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr = 10):
    """uint32 random words of a (M, BLOCK_N) block whose element (m, n) has offset row_offsets[m] + n.

    Bit-identical to `random_words(seed, row_offsets[:, None] + arange(BLOCK_N)[None, :])`, at one
    Philox evaluation per four elements. Requires every row_offsets[m] % 4 == 0 (e.g. rows of a
    contiguous pool whose row length is a multiple of 4) and BLOCK_N % 4 == 0; `row_offsets` is an
    (M,) int32/int64 block, `seed` a scalar or an (M,) block (one seed per row)."""
    tl.static_assert(BLOCK_N % 4 == 0, "random_words_rows: BLOCK_N must be a multiple of 4")
    M: tl.constexpr = row_offsets.shape[0]
    group = tl.arange(0, BLOCK_N // 4).to(tl.int64)
    base = row_offsets.to(tl.int64)[:, None] + 4 * group[None, :]        # (M, BLOCK_N // 4)
    c0, c1, _ = _counter_words(base)
    k0, k1 = seed_to_key(seed)
    if len(k0.shape) == 1:                                             # one seed per row
        k0 = k0[:, None]
        k1 = k1[:, None]
    zero = c0 * 0
    w0, w1, w2, w3 = philox4x32(c0, c1, zero, zero, k0, k1, N_ROUNDS)
    # interleave: element 4g + 2i + j takes word 2i + j of group g
    w = tl.join(tl.join(w0, w2), tl.join(w1, w3))                      # (M, BLOCK_N // 4, 2, 2)
    return tl.reshape(w, (M, BLOCK_N))
