"""Prefix caching over the checkpointing caches, as an engine would do it (`specssm demo --prefix-cache`).

Request A reaches the end of a shared prompt prefix with part of the prefix still in its SSM rings
(pnat > 0: its prompt tail went through verify steps, as a chunked prefill would); the engine folds the
rings in place (`TinyMamba2LM.materialize`, src == dst) and exports the slot's states (SSM checkpoint
and conv context) into its prefix cache. Request B, with the same prefix, imports them into a fresh
slot, feeds only its own suffix and decodes. B's tokens must equal those of a cold run of B (the whole
prompt prefilled), and A's those of a cold run of A (the early flush changes nothing but rounding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specssm.model.decode import GenerationResult, compare_tokens, decode_slots, speculative_generate


@torch.no_grad()
def feed(model, cache, slot: int, tokens: torch.Tensor, T: int) -> torch.Tensor:
    """Feed `tokens` (1-D, >= 1) to a slot through verify steps of up to T tokens, each accepted whole
    (a chunked prefill on the decode path). Returns the logits (vocab,) after the last token."""
    dev = model.device
    slots = torch.tensor([slot], dtype=torch.int32, device=dev)
    for i in range(0, tokens.numel(), T):
        chunk = tokens[i:i + T].to(dev)
        logits = model.step(chunk[None], cache, slots)
        cache.commit(slots, torch.tensor([chunk.numel()], dtype=torch.int32, device=dev), chunk.numel())
    return logits[0, -1]


@dataclass
class PrefixRun:
    tokens: list                 # per request (A, B): tokens decoded from the prefix cache's state
    cold: list                   # per request: tokens of the cold run (whole prompt prefilled)
    pnat_before: int             # A's unfolded ring tokens at the prefix boundary
    state_rel_err: float         # B's restored SSM states against the float64 reference at the boundary
    logit_rel_err: list          # per request: logits after its prompt against the float64 reference's
    diffs: list                  # per request: None or compare_tokens' first difference
    seconds: float


def logit_tolerance(act_dtype, state_dtype) -> float:
    """The largest logit error (of the largest logit) a correct restore shows: fp32 / fp64 activations and
    state ~1e-7 (a restore that loses the prefix's ring tokens or conv context: ~1e-2); 16-bit ones round
    to ~5e-3 on their own, so there the check is loose."""
    wide = (torch.float32, torch.float64)
    return 1e-4 if act_dtype in wide and state_dtype in wide else 3e-2


def _decode_from(model, cache, slot, first_logits, context, max_new_tokens, T, drafter):
    res = GenerationResult(tokens=[[int(first_logits.argmax())]], T=T)
    slots = torch.tensor([slot], dtype=torch.int32, device=model.device)
    return decode_slots(model, cache, slots, [list(context) + res.tokens[0]], res, max_new_tokens, T, drafter)


def run_prefix_cache(model, prefix: torch.Tensor, suffixes, max_new_tokens: int, T: int, make_drafter,
                     window: int = 16, state_dtype=torch.float32, tail: int | None = None) -> PrefixRun:
    """Two requests sharing `prefix` (1-D tokens), with their own `suffixes` (two 1-D token tensors, >= 1
    token each). Request A: prefill prefix[:-tail], feed the last `tail` prefix tokens through verify
    steps (default: T + 1, so the rings hold some at the boundary), materialize in place, export; then
    its suffix and decoding. Request B: import, its suffix, decoding. Each against a cold run."""
    t0 = time.perf_counter()
    tail = T + 1 if tail is None else tail
    if not 1 <= tail < prefix.numel():
        raise ValueError(f"tail: expected 1 <= tail < prefix length {prefix.numel()}, got {tail}")
    prompts = [torch.cat([prefix, s]) for s in suffixes]
    cold = [speculative_generate(model, [p], max_new_tokens, T, make_drafter(), window=window,
                                 state_dtype=state_dtype).tokens[0] for p in prompts]
    cache = model.new_cache(2, T, window, state_dtype)
    a, b = (int(s) for s in cache.allocate(2))
    model.prefill(prefix[:-tail], cache, a)
    feed(model, cache, a, prefix[-tail:], T)
    pnat_before = int(cache.ssm.pnat[a])
    slot_a = torch.tensor([a], dtype=torch.int32, device=model.device)
    model.materialize(cache, slot_a, slot_a)                   # early flush at the prefix boundary
    entry = {k: v.cpu() for k, v in cache.export_states(slot_a).items()}    # the engine's prefix cache
    cache.import_states(torch.tensor([b]), entry)
    _, ref_states = model.reference_forward(prefix)
    err = max(float((cache.ssm.implied_state(i, b, A) - h).abs().max() / h.abs().max())
              for i, (A, (_, h)) in enumerate(zip(model.ssm_A(), ref_states)))
    tokens, logit_err = [], []
    for slot, suffix, prompt in ((a, suffixes[0], prompts[0]), (b, suffixes[1], prompts[1])):
        logits = feed(model, cache, slot, suffix, T)
        # greedy tokens of a small random model hardly depend on the SSM state (its residual path
        # dominates): the logits show a wrong restore where the tokens may not
        want = model.reference_forward(prompt)[0][-1]
        logit_err.append(float((logits.double() - want).abs().max() / want.abs().max()))
        res = _decode_from(model, cache, slot, logits, prompt.tolist(), max_new_tokens, T, make_drafter())
        tokens.append(res.tokens[0])
    diffs = [compare_tokens(model, [p], [t], [c]) for p, t, c in zip(prompts, tokens, cold)]
    return PrefixRun(tokens, cold, pnat_before, err, logit_err, diffs, time.perf_counter() - t0)
