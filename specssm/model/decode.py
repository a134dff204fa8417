"""Greedy speculative decoding over the caches, plain greedy decoding, and drafters.

A verify step of a row feeds `T` tokens: the last generated token (not yet in the caches) and `T - 1`
drafted tokens. The target's greedy token after each of them decides how many drafts are accepted
(`n`, the leading drafts equal to the target's choice); the row keeps `acc = n + 1` of its `T` inputs
(`cache.commit`) and gains `n + 1` new tokens: the accepted drafts plus the target's token after them
(the bonus token, fed first in the next step). The result equals greedy decoding token by token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


# ---- drafters ---------------------------------------------------------------------------------------
class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    max_ngram down to min_ngram) and propose what followed it. Continuations that reach the end of the
    context go on through the tokens proposed so far, so a repeating cycle is proposed in full. Without
    any match it proposes the last token repeated."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"min_ngram: expected 1 <= min_ngram <= max_ngram={max_ngram}, got {min_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: list, k: int) -> list:
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            suffix = context[L - n:]
            for start in range(L - n - 1, -1, -1):
                if context[start:start + n] == suffix:
                    ext = list(context)
                    for j in range(k):
                        ext.append(ext[start + n + j])
                    return ext[L:]
        return [context[-1]] * k


class RandomDrafter:
    """Uniformly random drafts (seeded): low acceptance, to exercise the rejection paths."""

    def __init__(self, vocab_size: int = 256, seed: int = 0):
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, context: list, k: int) -> list:
        return torch.randint(0, self.vocab_size, (k,), generator=self.gen).tolist()


# ---- decoding ---------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    tokens: list                                     # per request: generated token ids
    T: int                                           # tokens per verify step
    steps: int = 0                                   # verify steps (forward passes over the caches)
    row_steps: int = 0                               # (row, step) pairs of live rows
    flushes: int = 0                                 # of those, rows that wrote their checkpoint
    accepted: list = field(default_factory=list)     # acc of every live (row, step), 1..T
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def flush_fraction(self) -> float:
        return self.flushes / max(self.row_steps, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.generated / max(self.decode_s, 1e-9)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def speculative_generate(model, prompts, max_new_tokens: int, T: int, drafter=None, cache=None,
                         window: int = 16, state_dtype=torch.float32) -> GenerationResult:
    """Greedy speculative decoding of a batch of prompts, all rows in one verify step each time.

    model: `TinyMamba2LM` (any tensor-parallel rank: all ranks must make the same calls).
    prompts: list of 1-D int tensors (>= 1 token each). max_new_tokens: tokens generated per request.
    T: tokens per verify step (1 = plain greedy decoding, no drafter needed).
    drafter: has `propose(context: list[int], k) -> list[int]` of k tokens (T >= 2).
    cache: a `ModelCache` with room for the batch and max_tokens >= T (default: a fresh one with
    `window` and `state_dtype`). Slots are allocated and freed here. Finished rows become padding
    rows until the whole batch is done.
    """
    if T < 1:
        raise ValueError(f"T: expected >= 1 tokens per verify step, got {T}")
    if T > 1 and drafter is None:
        raise ValueError(f"drafter: expected a drafter for T={T} > 1, got None")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    batch = len(prompts)
    if cache is None:
        cache = model.new_cache(batch, T, window, state_dtype)
    if cache.max_tokens < T:
        raise ValueError(f"cache: expected max_tokens >= T={T}, got {cache.max_tokens}")
    dev = model.device
    res = GenerationResult(tokens=[[] for _ in range(batch)], T=T)
    slots = cache.allocate(batch).to(dev)
    try:
        t0 = time.perf_counter()
        for b, prompt in enumerate(prompts):
            logits = model.prefill(prompt, cache, int(slots[b]))
            res.tokens[b].append(int(logits[-1].argmax()))
        _sync(dev)
        res.prefill_s = time.perf_counter() - t0
        contexts = [prompt.tolist() + res.tokens[b] for b, prompt in enumerate(prompts)]
        decode_slots(model, cache, slots, contexts, res, max_new_tokens, T, drafter)
    finally:
        cache.free(slots.cpu())
    return res


def decode_slots(model, cache, slots, contexts, res, max_new_tokens: int, T: int, drafter=None) -> GenerationResult:
    """The decode loop of `speculative_generate` from slots that already hold their prompts: row b's
    caches end just before its last token `res.tokens[b][-1]` (generated, not yet fed), `contexts[b]` is
    its prompt and tokens so far. Adds to `res` (tokens cut to max_new_tokens, counters, decode time)."""
    dev = model.device
    batch = len(contexts)
    t1 = time.perf_counter()
    pad = torch.full_like(slots, cache.pad_slot_id)
    while True:
        live = [len(res.tokens[b]) < max_new_tokens for b in range(batch)]
        if not any(live):
            break
        drafts = [drafter.propose(contexts[b], T - 1) if (live[b] and T > 1) else [0] * (T - 1)
                  for b in range(batch)]
        rows = torch.tensor([[res.tokens[b][-1]] + drafts[b] for b in range(batch)], dtype=torch.int64,
                            device=dev)
        sbi = torch.where(torch.tensor(live, device=dev), slots, pad)
        res.flushes += int(cache.will_write(sbi, T).sum())
        target = model.step(rows, cache, sbi).argmax(-1).tolist()          # (batch, T) greedy tokens
        accepted = []
        for b in range(batch):
            if not live[b]:
                accepted.append(1)
                continue
            n = 0
            while n < T - 1 and drafts[b][n] == target[b][n]:
                n += 1
            new = drafts[b][:n] + [target[b][n]]
            res.tokens[b].extend(new)
            contexts[b].extend(new)
            res.accepted.append(n + 1)
            accepted.append(n + 1)
        cache.commit(sbi, torch.tensor(accepted, dtype=torch.int32, device=dev), T)
        res.steps += 1
        res.row_steps += sum(live)
    _sync(dev)
    res.decode_s += time.perf_counter() - t1
    res.tokens = [t[:max_new_tokens] for t in res.tokens]
    return res


def greedy_generate(model, prompts, max_new_tokens: int, cache=None, window: int = 16,
                    state_dtype=torch.float32) -> GenerationResult:
    """Plain greedy decoding: one token per step (T = 1) over the same caches and ops."""
    return speculative_generate(model, prompts, max_new_tokens, 1, None, cache, window, state_dtype)


@torch.no_grad()
def reference_greedy(model, prompt: torch.Tensor, max_new_tokens: int):
    """Greedy decoding with the float64 token-by-token reference of the model (no caches, no ops).
    Returns (tokens, logits (max_new_tokens, vocab) float64 of the steps that chose them)."""
    logits, states = model.reference_forward(prompt)
    out, all_logits = [], []
    last = logits[-1]
    for _ in range(max_new_tokens):
        all_logits.append(last)
        out.append(int(last.argmax()))
        logits, states = model.reference_forward(torch.tensor([out[-1]], device=model.device), states)
        last = logits[-1]
    return out, torch.stack(all_logits)


@torch.no_grad()
def compare_tokens(model, prompts, tokens, want, tie_tol: float = 1e-3):
    """Compare two greedy decodings of `prompts` (lists of token lists). Returns None when equal, else
    a dict: request, index (first differing token), got, want, gap (the float64 reference's gap
    between its two best logits at that point, relative to its largest |logit|) and near_tie
    (gap < tie_tol: the rounding of a lower-precision run may pick either token there, so the
    difference is not an error)."""
    for r, (a, b) in enumerate(zip(tokens, want)):
        if len(a) != len(b):
            return dict(request=r, index=min(len(a), len(b)), got=len(a), want=len(b), gap=float("inf"),
                        near_tie=False)
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                ctx = torch.cat([prompts[r].to(model.device), torch.tensor(a[:i], dtype=torch.int64,
                                                                            device=model.device)])
                logits = model.reference_forward(ctx)[0][-1]
                top = logits.topk(2).values
                gap = float((top[0] - top[1]) / logits.abs().max())
                return dict(request=r, index=i, got=x, want=y, gap=gap, near_tie=gap < tie_tol)
    return None
