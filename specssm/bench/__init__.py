"""`specssm bench`: the benchmark harness (benchmarks/README.md says what it measures). CPU-safe to
import; GPU work starts in `specssm.bench.runner.GpuBench`.

    strategies  what sets each strategy apart (op, rings, plans, launch variants): one table
    mix         stationary pnat distribution of the commit chain, scenario sampling
    floor       bytes per step of each strategy, floor time
    cases       shapes, strategy variants, the case list of a run
    timing      CUPTI trace -> step spans (marker splitting), CUDA-graph capture, copy bandwidth; the
                quick loop's CUDA-event timer
    runner      caches, graphs, measurement loop (GPU)
    report      speedups, markdown / CSV / JSON, progress line
    plots       PNGs (matplotlib)
    cli         `specssm bench` argument parsing and the run

Beside it, a study: `drift` (`specssm drift`), the long-horizon drift of rounded / quantized checkpoints
on the float64 reference (CPU; results and their discussion in benchmarks/drift/).
"""
