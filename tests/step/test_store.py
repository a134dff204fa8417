"""Device functions of the state store (specssm/step/store.py) on their own."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from specssm.step.store import codes_to_half


@triton.jit
def _codes_kernel(q_ptr, out_ptr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, codes_to_half(tl.load(q_ptr + offs), OUT_DTYPE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_codes_to_half_is_exact(dtype, device):
    """Every int8 code, in shuffled order (so each packed register mixes signs), to bf16 / fp16 exactly:
    the packed PRMT/bf16x2 conversion when compiled, the fp32 path in the interpreter."""
    q = torch.arange(-128, 128, dtype=torch.int8)[torch.randperm(256, generator=torch.Generator().manual_seed(3))]
    q, out = q.to(device), torch.full((256,), float("nan"), dtype=dtype, device=device)
    _codes_kernel[(1,)](q, out, OUT_DTYPE=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, BLOCK=256)
    assert torch.equal(out.cpu().float(), q.cpu().float())
