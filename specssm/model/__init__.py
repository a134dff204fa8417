"""Mamba2 at decode time over the speculative caches: the mixer, a tiny LM, the spec-decode loop, TP.

Public API:
    Mamba2Config, SIZES                      model sizes ("tiny", "small", "large")
    Mamba2Mixer                              decode step / prefill / float64 reference of one layer
    TinyMamba2LM                             seeded random-weight byte-level LM (tensor parallel)
    ModelCache                               SSMCache + conv states and offsets, allocate/commit
    speculative_generate, greedy_generate    greedy spec decoding and plain T=1 decoding over the caches
    reference_greedy                         greedy decoding with the float64 token-by-token reference
    compare_tokens                           first difference of two decodings, and whether it is a near tie
    NgramDrafter, RandomDrafter              drafters (prompt lookup; random)
    resolve_ssu, resolve_conv                pick the SSM step op and the conv update
    specssm.model.tp.launch                  run a function on tp processes (gloo / nccl)
"""
from specssm.model.cache import ModelCache
from specssm.model.config import SIZES, Mamba2Config
from specssm.model.decode import (
    GenerationResult,
    NgramDrafter,
    RandomDrafter,
    compare_tokens,
    greedy_generate,
    reference_greedy,
    speculative_generate,
)
from specssm.model.lm import TinyMamba2LM
from specssm.model.mixer import Mamba2Mixer, gated_rmsnorm, resolve_conv, resolve_ssu, rmsnorm

__all__ = ["Mamba2Config", "SIZES", "Mamba2Mixer", "TinyMamba2LM", "ModelCache", "GenerationResult",
           "speculative_generate", "greedy_generate", "reference_greedy", "compare_tokens", "NgramDrafter",
           "RandomDrafter", "resolve_ssu", "resolve_conv", "gated_rmsnorm", "rmsnorm"]
