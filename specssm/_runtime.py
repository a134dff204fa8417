"""Where the kernels run: the Triton CPU interpreter, or a GPU that supports Programmatic Dependent Launch.

The one place that answers "is the interpreter on?". Two questions, two functions:

    interpreting()             would `triton.jit` build a kernel for the interpreter now (TRITON_INTERPRET,
                               read as Triton reads it)
    kernels_interpreted(k)     was kernel k (default: the step kernels) built for it; `triton.jit` decides
                               when a kernel is defined, so this is what a launch depends on
"""
from __future__ import annotations

import functools
import os
import sys

import torch

# the values Triton's getenv_bool takes as true (compared lower-case)
_TRUE = ("1", "true", "on", "yes", "y")


def interpreting() -> bool:
    """Whether Triton builds kernels for the CPU interpreter now (TRITON_INTERPRET=1, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


def kernels_interpreted(kernel=None) -> bool:
    """Whether specssm's Triton kernels were built for the CPU interpreter. `triton.jit` decides when a
    kernel is defined, so what counts is TRITON_INTERPRET when the kernel modules were imported, not its
    value now. `kernel`: that kernel (a `triton.jit` function); default: the step kernels, read back from
    specssm.quant.rounding, which every step kernel imports (before it is imported: `interpreting()`)."""
    if kernel is not None:
        from triton.runtime.interpreter import InterpretedFunction
        return isinstance(kernel, InterpretedFunction)
    rounding = sys.modules.get("specssm.quant.rounding")
    if rounding is not None:
        return not rounding.COMPILED.value
    return interpreting()


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """griddepcontrol (PDL) needs sm_90+ and compiled kernels; the interpreter has no inline PTX."""
    return device.type == "cuda" and not kernels_interpreted() and torch.cuda.get_device_capability(device)[0] >= 9
