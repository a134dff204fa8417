"""`specssm tune` (docs/tuning.md): the step's launch knobs searched on a GPU, written as its tuning table.

space      knobs per launch, families of launches timed together, analytic pruning rules
offline    sm_90 compiles in worker processes (no GPU needed): shared memory, registers, spills
search     measurement requests (logged, replayed on resume), acceptance rule, exhaustive / descent
log        the append-only run log (JSONL)
store      results -> schema-2 table entries (specssm/step/tables.py), summary.md
gpu        the GPU timer (the benchmark's method) and the output check
synthetic  a cost model in place of the GPU timer (CPU tests, --synthetic)
cli        the command line
"""
