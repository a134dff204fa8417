"""Quantization and stochastic-rounding building blocks for quantized SSM states (docs/design.md,
"The cache contract" and "Kernels": Store).

Device functions (`@triton.jit`, inlineable, fp32 blocks in): `philox` (random words keyed by
(seed, element offset)), `rounding` (RN / SR to fp16, bf16; per-row scaled int8, fp8 e4m3, int16).
Host launchers in `ops`; plain numpy/PyTorch references (the specification) in `reference`.
"""
from .ops import dequantize_rows, quantize_rows, round_to
from .ops import random_words as random_words_host
from .philox import philox4x32, random_words, random_words_rows, seed_to_key
from .rounding import (
    dequantize,
    quantize,
    quantize_fp8_rn,
    quantize_fp8_sr,
    quantize_int8_rn,
    quantize_int8_sr,
    quantize_int16_rn,
    quantize_int16_sr,
    round_bf16_rn,
    round_bf16_sr,
    round_fp16_rn,
    round_fp16_sr,
    round_half,
    row_scale,
    sr_to_bf16,
    sr_to_fp8,
    sr_to_fp16,
    sr_to_int8,
    sr_to_int16,
)

__all__ = [
    "philox4x32", "random_words", "random_words_rows", "seed_to_key",
    "dequantize", "quantize", "round_half", "quantize_fp8_rn", "quantize_fp8_sr", "quantize_int8_rn",
    "quantize_int8_sr", "quantize_int16_rn", "quantize_int16_sr", "round_bf16_rn", "round_bf16_sr", "round_fp16_rn",
    "round_fp16_sr", "row_scale", "sr_to_bf16", "sr_to_fp16", "sr_to_fp8", "sr_to_int8", "sr_to_int16",
    "dequantize_rows", "quantize_rows", "random_words_host", "round_to",
]
