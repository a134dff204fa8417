"""Where the kernels run: the Triton CPU interpreter, or a GPU that supports Programmatic Dependent Launch."""
from __future__ import annotations

import functools
import os
import sys

import torch


def interpreting() -> bool:
    """Whether Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernels_interpreted() -> bool:
    """Whether specssm's Triton kernels were built for the CPU interpreter. `triton.jit` decides when a
    kernel is defined, so what counts is TRITON_INTERPRET when the kernel modules were imported (read
    back from specssm.quant.rounding, which every step kernel imports), not its value now."""
    rounding = sys.modules.get("specssm.quant.rounding")
    if rounding is not None:
        return not rounding.COMPILED.value
    return interpreting()


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """griddepcontrol (PDL) needs sm_90+; the interpreter has no inline PTX."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9
