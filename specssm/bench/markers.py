"""Two tiny Triton kernels whose names delimit the steps of a benchmark graph in a CUPTI trace.

Their names must contain `timing.BEGIN_MARKER` / `timing.END_MARKER`. Imported only when a GPU run starts.
"""
import triton
import triton.language as tl


@triton.jit
def specssm_bench_begin_marker(flag_ptr):
    tl.store(flag_ptr, 1)


@triton.jit
def specssm_bench_end_marker(flag_ptr):
    tl.store(flag_ptr, 2)
