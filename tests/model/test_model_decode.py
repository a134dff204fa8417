"""The tiny LM and the speculative decoding loop: spec tokens == plain greedy tokens, statistics,
drafters, the demo."""
import pytest
import torch

from specssm._runtime import interpreting
from specssm.model import (
    SIZES,
    Mamba2Config,
    NgramDrafter,
    RandomDrafter,
    TinyMamba2LM,
    compare_tokens,
    greedy_generate,
    reference_greedy,
    speculative_generate,
)

TINY = SIZES["tiny"]
PROMPTS = [b"The quick brown fox ", b"abcabcab", b"\x00\xff"]


def prompts(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    base = [torch.tensor(list(p), dtype=torch.int64) for p in PROMPTS]
    return [torch.cat([torch.randint(0, 256, (3,), generator=g), base[i % len(base)]]) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [2, 4, 6])
def test_spec_decode_equals_greedy(seed, T):
    """Float64 activations (ties cannot flip) with an fp32 checkpoint: spec decoding over the caches
    gives the tokens of greedy decoding with the float64 token-by-token reference and of T=1 steps."""
    model = TinyMamba2LM(SIZES["small"], seed=seed, dtype=torch.float64, ssu="reference", conv="torch")
    ps = prompts(seed)
    n = 64
    spec = speculative_generate(model, ps, n, T, NgramDrafter(), window=16, state_dtype=torch.float32)
    ref = [reference_greedy(model, p, n)[0] for p in ps]
    assert spec.tokens == ref
    assert all(len(t) == n for t in spec.tokens)
    assert 1.0 <= spec.mean_accepted <= T
    if T == 4:
        assert greedy_generate(model, ps, n, state_dtype=torch.float32).tokens == ref


def test_spec_decode_low_acceptance_and_always_write():
    """A random drafter (acceptance ~1, every draft rejected) and the always-write strategy (W = 0,
    a write every step) still decode the greedy tokens."""
    model = TinyMamba2LM(TINY, seed=5, dtype=torch.float64, ssu="reference", conv="torch")
    ps = prompts(5, 2)
    ref = [reference_greedy(model, p, 40)[0] for p in ps]
    low = speculative_generate(model, ps, 40, 5, RandomDrafter(256, 0), state_dtype=torch.float64)
    assert low.tokens == ref and low.mean_accepted < 1.3
    cache = model.new_cache(4, 4, strategy="always_write", state_dtype=torch.float64)
    aw = speculative_generate(model, ps, 40, 4, NgramDrafter(), cache=cache)
    assert aw.tokens == ref and aw.flush_fraction == 1.0


def test_flush_fraction_follows_the_pnat_chain():
    """The loop's flush count equals the chain pnat' = acc if pnat + T > W else pnat + acc replayed
    from its accepted lengths; finished rows turn into padding rows and stop counting."""
    model = TinyMamba2LM(TINY, seed=1, dtype=torch.float64, ssu="reference", conv="torch")
    T, W = 4, 6
    ps = prompts(1, 3)
    res = speculative_generate(model, ps, 30, T, NgramDrafter(), window=W, state_dtype=torch.float64)
    assert len(res.accepted) == res.row_steps
    # replay the chain row by row: rows are interleaved per step in row order while live
    live_len = [1] * 3                                    # the token chosen after prefill
    pnat = [0] * 3
    flushes, k = 0, 0
    for _ in range(res.steps):
        for b in range(3):
            if live_len[b] >= 30:
                continue
            acc = res.accepted[k]
            k += 1
            flushes += pnat[b] + T > W
            pnat[b] = acc if pnat[b] + T > W else pnat[b] + acc
            live_len[b] += acc
    assert k == len(res.accepted) and flushes == res.flushes
    assert 0 < res.flush_fraction < 1


@pytest.mark.interpreter
def test_spec_decode_through_triton_ops():
    """End to end through the Triton conv update and checkpointing op (interpreter), fp32 state and
    activations, precision='exact': the tokens of the float64 reference greedy decoding."""
    model = TinyMamba2LM(TINY, seed=3, dtype=torch.float32, ssu="op", conv="triton", precision="exact")
    assert "checkpointing_ssu" in model.ssu_name and "Triton" in model.conv_name
    ps = prompts(3, 2)
    spec = speculative_generate(model, ps, 24, 4, NgramDrafter(), window=16, state_dtype=torch.float32)
    ref = [reference_greedy(model, p, 24)[0] for p in ps]
    assert spec.tokens == ref


def _verify_step_with_a_padding_row(ssu, plan_builds: list):
    """One verify step of 3 tokens on a fresh tiny model (Triton conv): rows on slot 2 (writes, pnat 2 + 3
    > window 4), a padding row, slot 0 (does not write, pnat 1). Returns (logits, cache); `plan_builds`
    (the list a patched StepPlan.build appends to) is cleared just before the step."""
    model = TinyMamba2LM(TINY, seed=4, dtype=torch.float32, ssu=ssu, conv="triton", precision="exact")
    cache = model.new_cache(4, 3, window=4)
    slots = torch.tensor([2, cache.pad_slot_id, 0], dtype=torch.int32)
    for r, s in enumerate((2, 0)):
        model.prefill(prompts(r, 1)[0], cache, s)
    cache.ssm.pnat[2], cache.ssm.pnat[0] = 2, 1
    tokens = torch.randint(0, 256, (3, 3), generator=torch.Generator().manual_seed(1))
    plan_builds.clear()
    return model.step(tokens, cache, slots), cache


@pytest.mark.interpreter
def test_one_plan_per_step_shared_by_the_layers(monkeypatch, tuned):
    """The Triton op takes a plan: the model builds one per verify step for all layers (split launches
    forced at this small batch), with the same logits and caches as letting each layer's op build its
    own."""
    from specssm.cache import StepPlan
    from specssm.ops import checkpointing_ssu
    tuned({"split_min_batch": 1})
    builds = []
    real_build = StepPlan.build
    monkeypatch.setattr(StepPlan, "build", lambda self, *a, **k: builds.append(1) or real_build(self, *a, **k))
    runs = []
    for ssu in ("op", lambda **kw: checkpointing_ssu(**kw, precision="exact")):   # the lambda takes no plan
        logits, cache = _verify_step_with_a_padding_row(ssu, builds)
        runs.append((len(builds), logits, cache.ssm.layers[0].state.clone(), cache.ssm.layers[-1].state.clone()))
    (n_op, *got), (n_own, *want) = runs
    assert n_op == 1 and n_own == TINY.n_layers > 1
    for a, b in zip(got, want):
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.interpreter
@pytest.mark.parametrize("split_min_batch, builds_per_step", [(128, 0), (3, 1), (4, 0)])
def test_plan_built_only_for_split_launches(split_min_batch, builds_per_step, monkeypatch, tuned):
    """Below the split batch the Triton op runs one dynamic launch and reads no plan: the model builds
    none (a launch per step saved), and the step's logits are those of the split launches."""
    from specssm.cache import StepPlan
    builds = []
    real_build = StepPlan.build
    monkeypatch.setattr(StepPlan, "build", lambda self, *a, **k: builds.append(1) or real_build(self, *a, **k))
    logits = []
    for smb in (split_min_batch, 1):
        tuned({"split_min_batch": smb})
        logits.append(_verify_step_with_a_padding_row("op", builds)[0])
        if smb == split_min_batch:
            assert len(builds) == builds_per_step
    live = [0, 2]
    assert torch.allclose(logits[0][live], logits[1][live], rtol=1e-5, atol=1e-5)


def test_compare_tokens_finds_the_first_difference():
    model = TinyMamba2LM(TINY, seed=2, dtype=torch.float64, ssu="reference", conv="torch")
    ps = prompts(2, 2)
    ref = [reference_greedy(model, p, 8)[0] for p in ps]
    assert compare_tokens(model, ps, ref, [list(t) for t in ref]) is None
    bad = [list(t) for t in ref]
    bad[1][5] = (bad[1][5] + 1) % 256
    d = compare_tokens(model, ps, bad, ref)
    assert (d["request"], d["index"], d["got"], d["want"]) == (1, 5, bad[1][5], ref[1][5])
    assert d["gap"] > 1e-3 and not d["near_tie"]
    assert compare_tokens(model, ps, bad, ref, tie_tol=1.0)["near_tie"]
    assert not compare_tokens(model, ps, [ref[0], ref[1][:4]], ref)["near_tie"]


def test_ngram_drafter():
    d = NgramDrafter(max_ngram=3)
    assert d.propose([1, 2, 3, 1, 2, 3, 1], 5) == [2, 3, 1, 2, 3]          # a cycle, continued past the end
    assert d.propose([7, 7], 3) == [7, 7, 7]
    assert d.propose([4, 5, 9, 4, 5], 2) == [9, 4]                           # longest suffix match first
    assert d.propose([1, 2, 3], 2) == [3, 3]                                 # no match: repeat the last
    assert d.propose([5, 1, 2, 9, 1, 2], 1) == [9]                            # latest occurrence
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)


def test_model_input_errors():
    model = TinyMamba2LM(TINY, seed=0, dtype=torch.float64, ssu="reference", conv="torch")
    cache = model.new_cache(2, 2)
    slots = cache.allocate(1)
    with pytest.raises(ValueError, match="tokens"):
        model.step(torch.zeros(1, 3, dtype=torch.int64), cache, slots)
    with pytest.raises(ValueError, match="tokens"):
        model.step(torch.full((1, 2), 256, dtype=torch.int64), cache, slots)
    with pytest.raises(TypeError, match="tokens"):
        model.step(torch.zeros(1, 2), cache, slots)
    with pytest.raises(ValueError, match="prompt"):
        model.prefill(torch.zeros(0, dtype=torch.int64), cache, 0)
    with pytest.raises(ValueError, match="drafter"):
        speculative_generate(model, [torch.tensor([1])], 4, 3)
    with pytest.raises(ValueError, match="tp_size"):
        TinyMamba2LM(Mamba2Config(nheads=4, ngroups=1), tp_size=2)


def test_demo_runs_and_checks(capsys):
    from specssm.model.demo import main
    rc = main(["--size", "tiny", "--tokens", "10", "--batch", "2", "-T", "4", "--greedy", "both",
               "--dtype", "fp32", "--fast-check", "on"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for word in ("tokens/s", "mean accepted length", "flush (write) fraction", "check: spec decode tokens ==",
                 "fast mode", "demo: OK"):
        assert word in out, out


def test_demo_says_when_it_falls_back_to_the_reference(capsys):
    """Without TRITON_INTERPRET=1 the CPU demo runs the float64 reference step and the torch conv; its
    output says so and how to run the kernels (and still checks the tokens)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root
    r = subprocess.run([sys.executable, "-m", "specssm", "demo", "--size", "tiny", "--tokens", "4", "--batch", "1",
                        "-T", "2"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ssu = checkpointing_ssu_ref (float64)" in r.stdout and "on cpu" in r.stdout, r.stdout
    assert "note: TRITON_INTERPRET=1 is not set" in r.stdout and "TRITON_INTERPRET=1 specssm demo" in r.stdout
    assert "demo: OK" in r.stdout
    if interpreting():                      # with the interpreter: the kernels, no note
        from specssm.model.demo import main
        assert main(["--size", "tiny", "--tokens", "2", "--batch", "1", "-T", "2"]) == 0
        out = capsys.readouterr().out
        assert "ssu = checkpointing_ssu(" in out and "note:" not in out, out


@pytest.mark.interpreter
@pytest.mark.parametrize("split_min_batch", [1, 128])
def test_model_step_records_a_bad_pnat_without_validation(split_min_batch, tuned):
    """validate=False: a row whose slot holds a pnat outside the contract does no work in any layer (no
    SSM step, no conv update: its conv state and offset keep their bits), the other rows' logits are
    those of a step without it, and the cache's fault record names it."""
    tuned({"split_min_batch": split_min_batch})
    runs = []
    for bad in (False, True):
        model = TinyMamba2LM(TINY, seed=4, dtype=torch.float32, ssu="op", conv="triton", precision="exact",
                             validate=False)
        cache = model.new_cache(4, 3, window=4)
        for r, s in enumerate((2, 0)):
            model.prefill(prompts(r, 1)[0], cache, s)
        cache.ssm.pnat[2], cache.ssm.pnat[0] = 2, 1
        if bad:
            cache.ssm.pnat[0] = 99
        tokens = torch.randint(0, 256, (3, 3), generator=torch.Generator().manual_seed(1))
        slots = torch.tensor([2, cache.pad_slot_id, 0 if bad else cache.pad_slot_id], dtype=torch.int32)
        conv_before = [cs.clone() for cs in cache.conv_states]
        runs.append((model.step(tokens, cache, slots), cache))
    (clean_logits, clean), (logits, cache) = runs
    assert torch.equal(logits[0], clean_logits[0])
    assert torch.equal(cache.ssm.layers[0].state[2], clean.ssm.layers[0].state[2])
    for cs, cs0, cs_clean in zip(cache.conv_states, conv_before, clean.conv_states):
        assert torch.equal(cs[0], cs0[0]), "the faulted row advanced its conv state"
        assert torch.equal(cs[2], cs_clean[2]) and not torch.equal(cs[2], cs0[2])
    with pytest.raises(ValueError, match=r"^prev_num_accepted_tokens: row 2 .* had 99"):
        cache.ssm.raise_if_faulted()
