"""GPU: the spec-decode equality through the Triton ops at a larger size, bf16 runs, TP over nccl, the
demo. Run with `make gpu-test` on the device."""
import pytest
import torch

from specssm.model import (
    SIZES,
    NgramDrafter,
    TinyMamba2LM,
    compare_tokens,
    greedy_generate,
    reference_greedy,
    speculative_generate,
)

pytestmark = pytest.mark.gpu

PROMPTS = [b"The quick brown fox jumps over the lazy dog. ", b"abcabcabc", b"0123456789", b"Mamba2 "]


def prompts():
    return [torch.tensor(list(p), dtype=torch.int64) for p in PROMPTS]


def assert_same_greedy(model, got, want):
    """Equal tokens, or a first difference where the float64 logits are a near tie (fp32 rounding
    may pick either token there; with d_model 1024 that happens in about one run in a hundred)."""
    diff = compare_tokens(model, prompts(), got, want)
    assert diff is None or diff["near_tie"], diff


@pytest.mark.parametrize("T", [4, 6])
def test_gpu_spec_decode_equals_greedy_large(T):
    """fp32 activations and state, the Triton op with precision='exact' and the Triton conv: spec
    decoding gives the tokens of T=1 greedy decoding over the same ops and of the float64 reference."""
    model = TinyMamba2LM(SIZES["large"], seed=0, dtype=torch.float32, device="cuda", ssu="op", conv="triton",
                         precision="exact")
    n = 128
    spec = speculative_generate(model, prompts(), n, T, NgramDrafter(), window=16, state_dtype=torch.float32)
    greedy = greedy_generate(model, prompts(), n, state_dtype=torch.float32)
    assert_same_greedy(model, spec.tokens, greedy.tokens)
    assert_same_greedy(model, spec.tokens, [reference_greedy(model, p, n)[0] for p in prompts()])
    assert spec.mean_accepted > 1.0 and 0.0 < spec.flush_fraction < 1.0


def test_gpu_small_model_equals_reference_many_seeds():
    for seed in range(4):
        model = TinyMamba2LM(SIZES["small"], seed=seed, dtype=torch.float32, device="cuda", ssu="op",
                             conv="triton", precision="exact")
        spec = speculative_generate(model, prompts(), 96, 5, NgramDrafter(), state_dtype=torch.float32)
        assert_same_greedy(model, spec.tokens, [reference_greedy(model, p, 96)[0] for p in prompts()])


def test_gpu_bf16_and_fast_mode_run():
    """bf16 activations and state, precision='fast': no equality promised (rounding can flip greedy
    ties), but the loop runs and yields valid tokens."""
    model = TinyMamba2LM(SIZES["large"], seed=1, dtype=torch.bfloat16, device="cuda", ssu="op", conv="triton",
                         precision="fast")
    res = speculative_generate(model, prompts(), 64, 6, NgramDrafter(), state_dtype=torch.bfloat16)
    assert all(len(t) == 64 and all(0 <= x < 256 for x in t) for t in res.tokens)
    assert res.mean_accepted >= 1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_tp2_nccl_generates_the_tokens_of_tp1():
    from specssm.model.tp import generate_many, launch
    spec = dict(cfg=SIZES["large"], seed=3, dtype="fp32", device="cuda", prompts=[list(p) for p in PROMPTS[:2]],
                max_new_tokens=64, T=4, drafter="ngram", ssu="op", conv="triton", window=16, state_dtype="fp32")
    one = launch(generate_many, 1, ([spec],), backend="nccl")[0][0]
    two = launch(generate_many, 2, ([spec],), backend="nccl")
    assert two[0][0]["tokens"] == two[1][0]["tokens"] == one["tokens"]


def test_gpu_demo_large():
    from specssm.model.demo import main
    assert main(["--device", "cuda", "--size", "large", "--tokens", "128"]) == 0


@pytest.mark.parametrize("batch", [8, 64])
def test_gpu_eager_step_in_a_cuda_graph_equals_eager(batch):
    """The step (validate=False) captured once in a CUDA graph and replayed over steps with a changing
    write mix (commits eager, between replays) gives eager's logits and cache contents: nothing the
    step reads is frozen at capture (batch 64 takes the split launches and their plan)."""
    from specssm.bench.timing import capture_graph
    torch.manual_seed(0)
    model = TinyMamba2LM(SIZES["small"], seed=3, dtype=torch.bfloat16, device="cuda", validate=False)
    T, W, steps = 6, 16, 6
    caches = [model.new_cache(batch, T, W, torch.bfloat16) for _ in range(2)]
    slots = [c.allocate(batch).cuda() for c in caches]
    tokens = [torch.randint(0, model.cfg.vocab_size, (batch, T), device="cuda") for _ in range(steps)]
    accepted = [torch.randint(1, T + 1, (batch,), device="cuda", dtype=torch.int32) for _ in range(steps)]
    tok, out = tokens[0].clone(), {}
    saved = [t.clone() for t in caches[1].tensors()]
    graph = capture_graph(lambda: out.update(logits=model.step_unchecked(tok, caches[1], slots[1])))
    for t, s in zip(caches[1].tensors(), saved):      # undo the capture's warm-up step
        t.copy_(s)
    for i in range(steps):
        want = model.step_unchecked(tokens[i], caches[0], slots[0]).clone()
        tok.copy_(tokens[i])
        graph.replay()
        torch.testing.assert_close(out["logits"], want, rtol=1e-5, atol=1e-5, msg=f"logits of step {i}")
        for c, s in zip(caches, slots):
            c.commit(s, accepted[i], T, validate=False)
        # integers (pnat, ring_start, offsets) exactly; data within an ulp of bf16 (cuBLAS may pick another
        # algorithm under capture), far below what a frozen input would change
        for j, (a, b) in enumerate(zip(caches[1].tensors(), caches[0].tensors())):
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, msg=f"tensor {j}, step {i}")
            else:
                assert torch.equal(a, b), f"tensor {j}, step {i}"
