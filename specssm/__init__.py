"""specssm: the decode-time Mamba2 SSM state update under speculative decoding, by checkpointing replay.

Public API:
    SSMCache, StepPlan                       cache contract, slots, commit, per-step plan
    checkpointing_ssu                        the product (Triton), FlashInfer-compatible signature
    always_write_ssu, all_states_ssu         baselines on the same API family (Triton)
    materialize                              fold slots' ring histories into fresh checkpoints (Triton);
                                             SSMCache.fork / export_states / import_states move slots
    specssm.reference                        float64 PyTorch references of all of the above
    torch.ops.specssm.*                      the kernel entry points as PyTorch custom ops, which the
                                             functions above call (specssm/library.py; torch.compile)
"""
from specssm.cache import SSMCache, StepPlan

__version__ = "0.1.0"
_OPS = ("checkpointing_ssu", "always_write_ssu", "all_states_ssu", "materialize")
__all__ = ["SSMCache", "StepPlan", *_OPS]       # the ops load on first use (__getattr__)


def __getattr__(name):
    # the kernels import triton; keep `import specssm` light for CPU-only tools
    if name in _OPS:
        from specssm import ops
        return getattr(ops, name)
    raise AttributeError(f"module 'specssm' has no attribute {name!r}")
