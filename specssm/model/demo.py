"""`specssm demo`: speculative decoding of a tiny random-weight Mamba2 LM over the checkpointing caches,
checked against plain greedy decoding (exit code 1 if the tokens differ).

Default: the "small" model on the CPU through the Triton interpreter (`make demo` sets
TRITON_INTERPRET=1), a few seconds. On a GPU: `specssm demo --device cuda --size large`.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from specssm._runtime import kernels_interpreted
from specssm.model.config import SIZES
from specssm.model.decode import (
    NgramDrafter,
    RandomDrafter,
    compare_tokens,
    greedy_generate,
    reference_greedy,
    speculative_generate,
)
from specssm.model.lm import TinyMamba2LM
from specssm.model.tp import DTYPES

# --compile: torch.compile backend (and mode) of TinyMamba2LM.compile_step
COMPILE_MODES = ("inductor", "aot_eager", "reduce-overhead")
PROMPTS = [b"The quick brown fox jumps over the lazy dog. ", b"Mamba2 state space model, speculative decoding: ",
           b"abcabcabc", b"Once upon a time, ", b"0123456789", b"specssm "]
PREFIX_SUFFIXES = [b"Once upon a time, ", b"0123456789"]      # --prefix-cache: after PROMPTS[0]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="specssm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default small)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (the Triton interpreter with TRITON_INTERPRET=1, else the float64 reference) or cuda")
    p.add_argument("--tokens", type=int, default=None, help="tokens generated per request "
                   "(default 48 on cpu, 256 on cuda)")
    p.add_argument("--batch", type=int, default=None, help="requests decoded together (default 2 on cpu, 8 on cuda)")
    p.add_argument("-T", "--tokens-per-step", dest="T", type=int, default=6,
                   help="tokens verified per step = draft length + 1 (default 6)")
    p.add_argument("--window", type=int, default=16, help="history window W of the checkpointing cache")
    p.add_argument("--drafter", choices=("ngram", "random"), default="ngram",
                   help="draft tokens from n-grams of the context (accepts often) or at random (rarely)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "fp64"), default="fp32",
                   help="activations (default fp32: greedy equality needs ties that cannot flip)")
    p.add_argument("--state-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the SSM checkpoint in the cache (default fp32)")
    p.add_argument("--ssu", choices=("auto", "op", "reference"), default="auto",
                   help="SSM step: the Triton op, the float64 reference, or auto (the op where it runs)")
    p.add_argument("--greedy", choices=("reference", "cache", "both"), default=None,
                   help="plain greedy decoding to compare with: the float64 token-by-token reference, T=1 "
                        "steps over the same caches and ops, or both (default: reference on cpu, both on cuda)")
    p.add_argument("--fast-check", choices=("on", "off", "auto"), default="auto",
                   help="also decode with precision='fast' and report agreement (auto: on for cuda; the "
                        "interpreter runs tf32 dots as fp32, so there it equals exact)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (processes; gloo on cpu, nccl on cuda)")
    p.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_MODES, default=None,
                   help="run the decode step through torch.compile(fullgraph=True): inductor (the default when "
                        "given alone), aot_eager, or reduce-overhead (inductor + CUDA graphs, cuda only); needs the "
                        "Triton ops (on a CPU: TRITON_INTERPRET=1)")
    p.add_argument("--prefix-cache", action="store_true",
                   help="two requests sharing a prompt prefix: the first's state at the prefix boundary is "
                        "materialized and exported, the second imports it and decodes only its suffix; both "
                        "checked against cold runs")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.tokens = a.tokens if a.tokens is not None else (256 if cuda else 48)
    a.batch = a.batch if a.batch is not None else (8 if cuda else 2)
    a.greedy = a.greedy or ("both" if cuda else "reference")
    a.fast = a.fast_check == "on" or (a.fast_check == "auto" and cuda)
    for name in ("tokens", "batch", "T", "tp"):
        if getattr(a, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(a, name)}")
    if a.compile and a.tp > 1:
        p.error("--compile: not with --tp (each rank would compile its own step)")
    if a.prefix_cache and (a.tp > 1 or a.compile):
        p.error("--prefix-cache: not with --tp or --compile")
    if a.compile == "reduce-overhead" and not cuda:
        p.error("--compile reduce-overhead: CUDA graphs need --device cuda")
    return a


def _kernels_run_here() -> bool:
    """On the CPU: the Triton interpreter was on when the kernels were (or will be) imported."""
    return kernels_interpreted()


def _show(tokens, n=24) -> str:
    """Bytes as hex (random weights write mostly unprintable bytes)."""
    return bytes(tokens[:n]).hex(" ") + (" ..." if len(tokens) > n else "")


def _agreement(tokens, want):
    """(tokens equal, tokens before the first difference) summed over rows."""
    same = prefix = 0
    for a, b in zip(tokens, want):
        same += sum(x == y for x, y in zip(a, b))
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        prefix += k
    return same, prefix


def _run_tp(a, cfg, prompts):
    from specssm.model.tp import generate_worker, launch
    spec = dict(cfg=cfg, seed=a.seed, dtype=a.dtype, device=a.device, prompts=[p.tolist() for p in prompts],
                max_new_tokens=a.tokens, T=a.T, drafter=a.drafter, ssu=a.ssu, precision="exact",
                window=a.window, state_dtype=a.state_dtype)
    t0 = time.perf_counter()
    res = launch(generate_worker, a.tp, (spec,), backend="nccl" if a.device == "cuda" else "gloo")
    print(f"tensor parallel: {a.tp} ranks ({'nccl' if a.device == 'cuda' else 'gloo'}), "
          f"{cfg.nheads // a.tp} heads and {cfg.ngroups // a.tp} groups per rank, {time.perf_counter() - t0:.1f} s "
          f"with startup")
    r0 = res[0]
    same_ranks = all(r["tokens"] == r0["tokens"] for r in res)
    print(f"spec decode (exact, rank 0): {r0['tokens_per_s']:.1f} tokens/s, mean accepted length "
          f"{r0['mean_accepted']:.2f} / {a.T}, flush fraction {r0['flush_fraction']:.2f}; ranks agree: {same_ranks}")
    return r0["tokens"], same_ranks


def _prefix_cache_demo(a, model, drafter, state_dtype) -> int:
    """`--prefix-cache`: request A (prefix + its suffix) and B (prefix + another suffix); B restores A's
    materialized state at the prefix boundary (specssm/model/prefix.py). Exit code 1 if a request's
    tokens differ from its cold run's (beyond a near tie)."""
    from specssm.model.prefix import logit_tolerance, run_prefix_cache
    prefix = torch.tensor(list(PROMPTS[0]), dtype=torch.int64)
    suffixes = [torch.tensor(list(s), dtype=torch.int64) for s in PREFIX_SUFFIXES]
    print(f"prefix cache: shared prefix of {prefix.numel()} tokens, suffixes of "
          f"{' and '.join(str(s.numel()) for s in suffixes)}; materialize = "
          f"{'Triton kernel' if model._triton_op() is not None else 'float64 reference'}")
    run = run_prefix_cache(model, prefix, suffixes, a.tokens, a.T, drafter, window=a.window, state_dtype=state_dtype)
    print(f"request A: {run.pnat_before} prefix tokens in its rings at the boundary, folded in place "
          f"(materialize src == dst) and exported")
    print(f"request B: imported the prefix state into a fresh slot; its SSM states against the float64 "
          f"reference at the boundary: max error {run.state_rel_err:.1e} of the largest element")
    tol = logit_tolerance(model.dtype, state_dtype)
    ok = True
    for name, diff, tokens, err in zip("AB", run.diffs, run.tokens, run.logit_rel_err):
        good = err <= tol
        ok &= good
        print(f"check: request {name}'s logits after its prompt against the float64 reference: max error {err:.1e} "
              f"of the largest (<= {tol:.0e}): {'OK' if good else 'FAILED'}")
        if diff is None:
            print(f"check: request {name} from the prefix cache == its cold run: OK ({len(tokens)} tokens)")
        elif diff["near_tie"]:
            print(f"check: request {name} == its cold run up to a near tie at token {diff['index']} (float64 "
                  f"logit gap {diff['gap']:.1e}): OK")
        else:
            ok = False
            print(f"check: request {name} != its cold run: FAILED at token {diff['index']} ({diff['got']} vs "
                  f"{diff['want']}; float64 logit gap {diff['gap']:.1e})")
    print(f"request B: {bytes(PROMPTS[0] + PREFIX_SUFFIXES[1])!r} -> {_show(run.tokens[1])} ({run.seconds:.1f} s)")
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("specssm demo: --device cuda asked for, but no CUDA device is available", file=sys.stderr)
        return 2
    if a.device == "cpu":
        torch.set_num_threads(1)            # tiny tensors: threads only add overhead
    cfg = SIZES[a.size]
    dtype = DTYPES[a.dtype]
    prompts = [torch.tensor(list(PROMPTS[i % len(PROMPTS)]), dtype=torch.int64) for i in range(a.batch)]
    mode = "Triton interpreter" if a.device == "cpu" and _kernels_run_here() else a.device
    print(f"specssm demo: tiny Mamba2 LM '{a.size}' (d_model {cfg.d_model}, {cfg.n_layers} layers, H {cfg.nheads}, "
          f"P {cfg.head_dim}, N {cfg.d_state}, G {cfg.ngroups}, vocab {cfg.vocab_size}), seed {a.seed}, "
          f"{a.dtype} on {mode}")
    print(f"decoding {a.batch} request(s) x {a.tokens} tokens, T = {a.T} ({a.drafter} drafter), "
          f"checkpointing cache W = {a.window}, {a.state_dtype} state")
    # CUDA graphs cannot hold the ops' host checks: the graphed step runs without them
    graphs = a.compile == "reduce-overhead"
    model = TinyMamba2LM(cfg, seed=a.seed, dtype=dtype, device=a.device, ssu=a.ssu, precision="exact",
                         validate=not graphs)
    print(f"ops: ssu = {model.ssu_name}; conv = {model.conv_name}")
    if a.compile:
        if not model.runs_triton_ops:
            print("specssm demo: --compile needs the Triton ops (on a CPU: TRITON_INTERPRET=1 before the start); "
                  f"got ssu = {model.ssu_name}, conv = {model.conv_name}", file=sys.stderr)
            return 2
        if graphs:
            model.compile_step("inductor", mode="reduce-overhead")
        else:
            model.compile_step(a.compile)
        print(f"decode step: {model.compiled} (compiled at its first step of each shape)")
    if a.device == "cpu" and a.ssu == "auto" and not _kernels_run_here():
        print("note: TRITON_INTERPRET=1 is not set, so the Triton kernels cannot run on this CPU: the demo "
              "falls back to the float64 reference step and the torch conv (it checks the cache contract, "
              "not the kernels). `TRITON_INTERPRET=1 specssm demo` (what `make demo` runs) decodes through "
              "the kernels in the interpreter.")
    state_dtype = DTYPES[a.state_dtype]

    def drafter():
        return NgramDrafter() if a.drafter == "ngram" else RandomDrafter(cfg.vocab_size, a.seed)

    if a.device == "cuda" and a.tp == 1:
        # compile the kernels (T-token and 1-token steps) before anything is timed
        speculative_generate(model, prompts[:1], 2 * a.T, a.T, drafter(), window=a.window, state_dtype=state_dtype)
        greedy_generate(model, prompts[:1], 2, window=a.window, state_dtype=state_dtype)

    if a.prefix_cache:
        return _prefix_cache_demo(a, model, drafter, state_dtype)

    ok = True
    if a.tp > 1:
        spec_tokens, ok = _run_tp(a, cfg, prompts)
    else:
        spec = speculative_generate(model, prompts, a.tokens, a.T, drafter(), window=a.window, state_dtype=state_dtype)
        spec_tokens = spec.tokens
        print(f"spec decode (exact): {spec.generated} tokens in {spec.steps} steps, {spec.tokens_per_s:.1f} tokens/s, "
              f"mean accepted length {spec.mean_accepted:.2f} / {a.T}, flush (write) fraction "
              f"{spec.flush_fraction:.2f}")

    greedy = {}
    if a.greedy in ("cache", "both"):
        g = greedy_generate(model, prompts, a.tokens, window=a.window, state_dtype=state_dtype)
        greedy["greedy (T=1 steps, same ops)"] = g.tokens
        print(f"greedy (T=1 steps, same ops): {g.tokens_per_s:.1f} tokens/s, flush fraction {g.flush_fraction:.2f}")
    if a.greedy in ("reference", "both"):
        t0 = time.perf_counter()
        ref = [reference_greedy(model, p, a.tokens) for p in prompts]
        greedy["greedy (float64 reference)"] = [r[0] for r in ref]
        print(f"greedy (float64 token-by-token reference): {time.perf_counter() - t0:.1f} s")
    for name, want in greedy.items():
        diff = compare_tokens(model, prompts, spec_tokens, want)
        if diff is None:
            print(f"check: spec decode tokens == {name}: OK ({sum(map(len, want))} tokens)")
        elif diff["near_tie"]:
            print(f"check: spec decode tokens == {name} up to a near tie: request {diff['request']}, token "
                  f"{diff['index']} ({diff['got']} vs {diff['want']}; the float64 logits of the two differ by "
                  f"{diff['gap']:.1e} of the largest, within rounding): OK")
        else:
            ok = False
            print(f"check: spec decode tokens != {name}: FAILED at request {diff['request']}, token "
                  f"{diff['index']} ({diff['got']} vs {diff['want']}; float64 logit gap {diff['gap']:.1e})")

    if a.fast and a.tp == 1:
        model.set_ops(a.ssu, precision="fast", validate=not graphs)      # eager again
        if "fast" in model.ssu_name:
            f = speculative_generate(model, prompts, a.tokens, a.T, drafter(), window=a.window, state_dtype=state_dtype)
            want = next(iter(greedy.values()))
            same, prefix = _agreement(f.tokens, want)
            n = sum(map(len, want))
            print(f"fast mode (tf32 dots): {f.tokens_per_s:.1f} tokens/s; agrees with greedy on {same}/{n} tokens "
                  f"({prefix}/{n} before the first difference)")
        else:
            print(f"fast mode: not available ({model.ssu_name} has one precision)")
    elif a.tp > 1:
        print("fast mode: not run with --tp")
    elif _kernels_run_here():
        print("fast mode: skipped (the interpreter runs tf32 dots as fp32, so it equals exact; --fast-check on to run)")
    else:
        print("fast mode: skipped (--fast-check on to run)")

    for r in range(min(a.batch, 2)):
        print(f"request {r}: {bytes(prompts[r].tolist())!r} -> {_show(spec_tokens[r])}")
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
