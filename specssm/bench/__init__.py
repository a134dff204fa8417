"""`specssm bench`: the benchmark harness (DESIGN §6). CPU-safe to import; GPU work starts in
`specssm.bench.runner.GpuBench`.

    mix     stationary pnat distribution of the commit chain, scenario sampling
    floor   bytes per step of each strategy, floor time
    cases   shapes, strategy variants, the case list of a run
    timing  CUPTI trace -> step spans (marker splitting), CUDA-graph capture, copy bandwidth
    runner  caches, graphs, measurement loop (GPU)
    report  speedups, markdown / CSV / JSON, progress line
    plots   PNGs (matplotlib)
    cli     `specssm bench` argument parsing and the run
"""
