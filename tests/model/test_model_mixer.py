"""Mamba2Mixer: decode steps with partial acceptance and prefill against the float64 token-by-token
reference of the whole mixer; the cache contract after prefill; parameter sharding; input errors."""
import pytest
import torch

from specssm._runtime import interpreting
from specssm.conv.reference import conv1d_sequential_ref
from specssm.model import Mamba2Config, Mamba2Mixer, ModelCache, gated_rmsnorm, resolve_conv, resolve_ssu
from specssm.model.mixer import init_mixer_params, shard_mixer_params

CFG = Mamba2Config(d_model=32, n_layers=1, nheads=4, head_dim=8, d_state=8, ngroups=2, d_conv=4)

# (activation dtype, state dtype, ssu, conv, tolerance relative to max |ref|)
F64 = (torch.float64, torch.float64, "reference", "torch", 1e-11)
F32_REF = (torch.float32, torch.float32, "reference", "torch", 5e-5)
F32_TRITON = (torch.float32, torch.float32, "auto", "auto", 5e-5)   # the Triton op and conv (interpreter)
BF16_TRITON = (torch.bfloat16, torch.bfloat16, "auto", "auto", 5e-2)  # every intermediate rounded to bf16


def make(cfg, dtype, state_dtype, ssu, conv, slots=6, T=4, window=8, seed=0, strategy="checkpointing"):
    gen = torch.Generator().manual_seed(seed)
    mixer = Mamba2Mixer(cfg, init_mixer_params(cfg, gen), 0, dtype)
    cache = ModelCache(cfg, slots, T, window, state_dtype, dtype, strategy=strategy)
    ssu_fn, _ = resolve_ssu(ssu, "cpu", "exact", True, dtype)
    conv_fn, _ = resolve_conv(conv, "cpu", dtype)
    return mixer, cache, ssu_fn, conv_fn


def rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("case,T,window", [
    (F64, 4, 8), (F64, 3, 16), (F32_REF, 4, 8), (F32_REF, 3, 16), (F32_TRITON, 4, 8), (F32_TRITON, 3, 16),
    (BF16_TRITON, 5, 8)], ids=["fp64-T4", "fp64-T3", "fp32-ref-T4", "fp32-ref-T3", "fp32-triton-T4",
                               "fp32-triton-T3", "bf16-triton-T5"])
def test_decode_steps_match_full_sequence_reference(case, T, window):
    """Rows with their own slots, prompt lengths and random acceptance (plus a padding row) take many
    verify steps; the outputs of every accepted token equal the float64 reference over the sequence."""
    dtype, state_dtype, ssu, conv, tol = case
    if conv == "auto" and not interpreting():
        pytest.skip("the Triton path on CPU needs TRITON_INTERPRET=1")
    steps = 10 if ssu == "auto" else 14
    mixer, cache, ssu_fn, conv_fn = make(CFG, dtype, state_dtype, ssu, conv, T=T, window=window)
    gen = torch.Generator().manual_seed(T * 100 + window)
    slots = cache.allocate(4)
    order = [2, 0, 3]                                     # rows use slots out of order; slot 1 idles
    prompt_lens = [5, 1, 9]
    seqs = [torch.randn(prompt_lens[i] + steps * T, CFG.d_model, dtype=torch.float64, generator=gen).to(dtype)
            for i in range(3)]
    refs = [mixer.reference_forward(s)[0] for s in seqs]
    pos = []
    for i, s in enumerate(order):
        out = mixer.prefill(seqs[i][:prompt_lens[i]], cache, int(slots[s]))
        assert rel_err(out, refs[i][:prompt_lens[i]]) < tol
        pos.append(prompt_lens[i])
    pad = cache.pad_slot_id
    for step in range(steps):
        entries = []                                      # (slot, T inputs, request) per batch row
        for i in range(3):
            acc = int(torch.randint(1, T + 1, (), generator=gen))
            x = torch.randn(T, CFG.d_model, dtype=torch.float64, generator=gen).to(dtype)  # rejected drafts
            x[:acc] = seqs[i][pos[i]:pos[i] + acc]
            entries.append((int(slots[order[i]]), x, i, acc))
        junk = torch.randn(T, CFG.d_model, dtype=torch.float64, generator=gen).to(dtype)
        entries.insert(step % 4, (pad, junk, None, 1))    # a padding row somewhere in the batch
        sbi = torch.tensor([e[0] for e in entries], dtype=torch.int32)
        out = mixer.step(torch.stack([e[1] for e in entries]), cache, sbi, ssu_fn, conv_fn)
        for r, (_, _, i, acc) in enumerate(entries):
            if i is None:
                continue
            assert torch.isfinite(out[r]).all()
            assert rel_err(out[r, :acc], refs[i][pos[i]:pos[i] + acc]) < tol, (step, i)
            pos[i] += acc
        cache.commit(sbi, torch.tensor([e[3] for e in entries], dtype=torch.int32), T)
    # the slot that only idled kept its fresh state and empty history
    assert int(cache.ssm.pnat[slots[1]]) == 0 and int(cache.conv_offset[slots[1]]) == 0
    assert cache.ssm.layers[0].state[slots[1]].abs().max() == 0


@pytest.mark.parametrize("prompt_len", [1, 2, 3, 11])
@pytest.mark.parametrize("state_dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_prefill_leaves_contract_state(prompt_len, state_dtype):
    """After prefill: the SSM state is the reference state rounded to the state dtype, pnat 0,
    ring_start 0, the conv context is the last d_conv - 1 conv inputs (zeros in front of short
    prompts), conv_offset 0; decoding then continues correctly."""
    dtype = torch.float64
    mixer, cache, ssu_fn, conv_fn = make(CFG, dtype, state_dtype, "reference", "torch", T=4, window=8)
    gen = torch.Generator().manual_seed(prompt_len)
    slot = int(cache.allocate(3)[2])
    # dirty the slot's caches as an earlier request would have
    cache.ssm.pnat[slot], cache.ssm.ring_start[slot], cache.conv_offset[slot] = 5, 7, 3
    cache.conv_states[0][slot] = 1.0
    seq = torch.randn(prompt_len + 4, CFG.d_model, dtype=dtype, generator=gen)
    ref_out, (window, h) = mixer.reference_forward(seq[:prompt_len])
    out = mixer.prefill(seq[:prompt_len], cache, slot)
    assert rel_err(out, ref_out) < 1e-11
    assert int(cache.ssm.pnat[slot]) == 0 and int(cache.ssm.ring_start[slot]) == 0
    assert int(cache.conv_offset[slot]) == 0
    stored = cache.ssm.layers[0].state[slot]
    assert stored.dtype == state_dtype
    assert torch.equal(stored, h.to(state_dtype))
    # conv context: the raw conv inputs (in_proj's xBC slice) of the last d_conv - 1 prompt tokens
    d_ctx = CFG.d_conv - 1
    xbc_in = (seq[:prompt_len] @ mixer.in_proj.T)[:, CFG.d_inner:CFG.d_inner + CFG.conv_dim]
    want = torch.cat([torch.zeros(max(d_ctx - prompt_len, 0), CFG.conv_dim, dtype=dtype), xbc_in[-d_ctx:]])
    assert torch.equal(cache.conv_states[0][slot, :d_ctx], want)
    assert torch.equal(window, want)                      # the reference's window agrees
    # decoding continues from the stored (rounded) state: compare with the reference from it
    out = mixer.step(seq[None, prompt_len:], cache, torch.tensor([slot], dtype=torch.int32), ssu_fn, conv_fn)
    ref_next, _ = mixer.reference_forward(seq[prompt_len:], (window, stored.double()))
    assert rel_err(out[0], ref_next) < 1e-11


def test_reference_forward_is_resumable_and_sequential():
    """The reference over a whole sequence equals the reference over two parts with the carried state,
    and its conv window matches the conv helper's sequential reference."""
    gen = torch.Generator().manual_seed(3)
    mixer = Mamba2Mixer(CFG, init_mixer_params(CFG, gen), 0, torch.float64)
    seq = torch.randn(12, CFG.d_model, dtype=torch.float64, generator=gen)
    full, (win, h) = mixer.reference_forward(seq)
    a, st = mixer.reference_forward(seq[:5])
    b, (win2, h2) = mixer.reference_forward(seq[5:], st)
    assert torch.allclose(torch.cat([a, b]), full, rtol=0, atol=1e-13)
    # the window holds in_proj outputs: a BLAS matmul of 7 rows may round differently from one of 12
    assert torch.allclose(win, win2, rtol=0, atol=1e-13) and torch.allclose(h, h2, rtol=0, atol=1e-13)
    xbc_in = (seq @ mixer.in_proj.T)[:, CFG.d_inner:CFG.d_inner + CFG.conv_dim]
    _, w = conv1d_sequential_ref(xbc_in[None], torch.zeros(1, 3, CFG.conv_dim, dtype=torch.float64),
                                 mixer.conv_weight, mixer.conv_bias)
    assert torch.equal(w[0], win)


def test_step_passes_tied_parameters_as_stride0_views():
    """The op gets A (H, P, N), D and dt_bias (H, P) as stride-0 expanded views, dt tied over P."""
    mixer, cache, _, conv_fn = make(CFG, torch.float32, torch.float32, "reference", "torch")
    seen = {}

    def spy(**kw):
        seen.update(kw)
        kw["out"].fill_(0.5)
        return kw["out"]

    slots = cache.allocate(2)
    out = mixer.step(torch.randn(2, 4, CFG.d_model), cache, slots, spy, conv_fn)
    H, P, N = CFG.nheads, CFG.head_dim, CFG.d_state
    assert seen["A"].shape == (H, P, N) and seen["A"].stride()[1:] == (0, 0)
    assert bool((seen["A"] < 0).all())
    assert seen["D"].shape == (H, P) and seen["D"].stride(1) == 0
    assert seen["dt_bias"].shape == (H, P) and seen["dt_bias"].stride(1) == 0
    assert seen["dt"].shape == (2, 4, H, P) and seen["dt"].stride(-1) == 0
    assert seen["dt_softplus"] is True and seen["z"] is None
    assert seen["B"].shape == (2, 4, CFG.ngroups, N) and seen["C"].shape == (2, 4, CFG.ngroups, N)
    assert seen["window"] == 8 and seen["state_batch_indices"] is slots
    assert out.shape == (2, 4, CFG.d_model) and torch.isfinite(out).all()


def test_gated_rmsnorm_is_groupwise():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(3, 12, dtype=torch.float64, generator=gen)
    z = torch.randn(3, 12, dtype=torch.float64, generator=gen)
    w = torch.rand(12, dtype=torch.float64, generator=gen)
    got = gated_rmsnorm(y, z, w, 3, 1e-5)
    v = y * z * torch.sigmoid(z)
    for g in range(3):
        s = v[:, 4 * g:4 * g + 4]
        want = s / torch.sqrt((s * s).mean(-1, keepdim=True) + 1e-5) * w[4 * g:4 * g + 4]
        assert torch.allclose(got[:, 4 * g:4 * g + 4], want, rtol=1e-14, atol=0)


def test_shards_partition_the_layer():
    """Sharded in_proj/conv rows are disjoint and cover the layer; each rank's heads read its groups."""
    cfg = Mamba2Config(d_model=8, n_layers=1, nheads=4, head_dim=2, d_state=3, ngroups=2)
    p = {k: torch.arange(v.shape[0], dtype=torch.float64)[:, None].expand_as(v) if v.dim() == 2 else
         torch.arange(v.shape[0], dtype=torch.float64) for k, v in init_mixer_params(cfg, torch.Generator()).items()}
    p["out_proj"] = torch.arange(cfg.d_inner, dtype=torch.float64)[None].expand(cfg.d_model, -1)
    shards = [shard_mixer_params(cfg, p, r, 2) for r in range(2)]
    rows = torch.cat([s["in_proj"][:, 0] for s in shards]).sort().values
    assert torch.equal(rows, torch.arange(cfg.d_in_proj, dtype=torch.float64))
    conv = torch.cat([s["conv_weight"][:, 0] for s in shards]).sort().values
    assert torch.equal(conv, torch.arange(cfg.conv_dim, dtype=torch.float64))
    # rank 1: z rows 4..7, x rows 12..15, B rows of group 1 (16 + 3..5), C (22 + 3..5), dt head 2, 3
    assert shards[1]["in_proj"][:, 0].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 19, 20, 21, 25, 26, 27, 30, 31]
    assert shards[1]["out_proj"][0].tolist() == [4, 5, 6, 7]
    assert shards[1]["A_log"].tolist() == [2, 3]


def test_input_errors():
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Config(nheads=4, ngroups=3)
    with pytest.raises(ValueError, match="tp_size"):
        Mamba2Config(nheads=4, ngroups=1).local(2)
    with pytest.raises(ValueError, match="d_conv"):
        Mamba2Config(d_conv=5)
    with pytest.raises(ValueError, match="ssu"):
        resolve_ssu("fastest")
    with pytest.raises(ValueError, match="precision"):
        resolve_ssu("auto", precision="tf32")
    with pytest.raises(ValueError, match="conv"):
        resolve_conv("cuda-graph")
    with pytest.raises(ValueError, match="strategy"):
        ModelCache(CFG, 2, 4, strategy="all_states")
