#!/usr/bin/env bash
# Everything a device session runs, in one call (the device tool runs it from the repo root; $OUT comes back).
#   bash scripts/gpu_session.sh tests      # the GPU suite (~10 min on a fresh H200: near a call's limit)
#   bash scripts/gpu_session.sh tests ops  # its tests/ops half; `tests rest` the other half (one call each)
#   bash scripts/gpu_session.sh bench      # Super TP8 + TP1 default-variant benchmark, 5 state dtypes (~2.5 min);
#                                          # + the seed (--peer trtllm=.peers) when .peers/trtllm_replay exists
#   bash scripts/gpu_session.sh pdl        # conv1d -> step with and without PDL (~1 min)
#   bash scripts/gpu_session.sh sweep      # register caps / token tile / TMA of the split launches, 5 dtypes (~4 min)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
case "${1:-tests}" in
  tests)
    case "${2:-all}" in
      all) sel=(tests) ;;
      ops) sel=(tests/ops) ;;
      rest) sel=(tests --ignore=tests/ops) ;;
      *) echo "tests: expected all, ops or rest, got ${2}" >&2; exit 2 ;;
    esac
    # the machine's torch / triton against pyproject.toml's range (logged; the suite runs either way)
    python3 scripts/check_versions.py > "$OUT/gpu_tests.log" 2>&1
    python3 -m pytest -q -m gpu "${sel[@]}" -p no:cacheprovider --durations=5 >> "$OUT/gpu_tests.log" 2>&1
    grep -E "^versions|^unsupported|^FAILED|^ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -20 ;;
  bench)
    # the committed benchmarks/results/<card>.md (~2.5 min on an H200 or H100); --batches 1,2,4,...,1024 for the
    # full matrix (use --time-budget and --resume). With .peers/trtllm_replay (benchmarks/README.md) the seed
    # runs beside it (its cases and Triton compiles add time: not measured yet; the budget still holds)
    peer=()
    [ -d .peers/trtllm_replay ] && peer=(--peer trtllm=.peers)
    python3 -m specssm bench --shapes super_tp8,tp1 --dtypes fp32,bf16,fp16,int8,fp8 --batches 1,8,64,256,1024 \
      --launch auto --time-budget 480 --out "$OUT/bench" --results-md "$OUT/results.md" ${peer[@]+"${peer[@]}"} \
      2> "$OUT/bench_progress.log" | tail -3
    (cd "$OUT" && tar czf bench.tgz bench && rm -rf bench) ;;
  pdl)
    python3 scripts/pdl_check.py --out "$OUT" | tail -6 ;;
  sweep)
    # the split launches' register caps, token tile and TMA state reads of the write launch, per state dtype,
    # against the card's table ({}; an override replaces a table's whole write / no_write entry)
    for st in float32 bfloat16 float16 int8 float8_e4m3fn; do
      python3 scripts/quick_bench.py --batches 1024,256 --modes split_rect --state $st --out "$OUT" \
        --sweep '[{},{"TN_MIN":16},{"no_write":{"maxnreg":96}},{"write":{"maxnreg":128}},{"write":{"maxnreg":128,"tma":true}},{"write":{"maxnreg":168,"tma":true}},{"write":{"maxnreg":168}}]' \
        2>&1 | grep -v "^#\|^kernel" | sed "s/^/$st /"
    done ;;
esac
