#!/usr/bin/env bash
# Everything a device session runs, in one call (the device tool runs it from the repo root; $OUT comes back).
#   bash scripts/gpu_session.sh tests      # the GPU suite (over 10 min on a fresh H200 in one process; with
#                                          # .gpu_deps, 12 pytest-xdist workers: `pip download --no-deps -d w
#                                          # pytest-xdist execnet` and unzip the wheels into .gpu_deps)
#   bash scripts/gpu_session.sh tests step # its tests/step half; `tests rest` the other half (one call each);
#                                          # `tests FILE`: the test ids listed in FILE, one per line
#   bash scripts/gpu_session.sh bench      # Super TP8 + TP1 default-variant benchmark, 5 state dtypes (~2.5 min);
#                                          # + the seed (--peer trtllm=.peers) when .peers/trtllm_replay exists
#   bash scripts/gpu_session.sh pdl        # conv1d -> step with and without PDL (~1 min)
#   bash scripts/gpu_session.sh compiled   # the tiny LM's decode step, eager vs torch.compile (~3 min: not run yet)
#   bash scripts/gpu_session.sh sweep      # split-family variants beside the seed and the fused launch, 5 dtypes (~5 min)
#   bash scripts/gpu_session.sh ncu        # Nsight Compute on one step of ours and of the seed (NCU_STATE, NCU_BATCH)
#   bash scripts/gpu_session.sh tune       # an ~8 min slice of `specssm tune` (resumes out/tune: carry it along)
#   bash scripts/gpu_session.sh materialize  # materialize's GPU tests, then its timing at 1,024 slots (not run yet)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# pytest-xdist unpacked into .gpu_deps (ignored; carry it) spreads the suite's compiles over the machine's cores
[ -d .gpu_deps/xdist ] && PYTHONPATH=$PWD:$PWD/.gpu_deps
workers=()
[ -d .gpu_deps/xdist ] && workers=(-n "${GPU_WORKERS:-12}")
OUT=${OUT:-out}
mkdir -p "$OUT"
case "${1:-tests}" in
  tests)
    case "${2:-all}" in
      all) sel=(tests) ;;
      step) sel=(tests/step) ;;
      rest) sel=(tests --ignore=tests/step) ;;
      *) [ -f "$2" ] || { echo "tests: expected all, step, rest or a file of test ids, got ${2}" >&2; exit 2; }
         mapfile -t sel < "$2" ;;
    esac
    # the machine's torch / triton against pyproject.toml's range (logged; the suite runs either way)
    python3 scripts/check_versions.py > "$OUT/gpu_tests.log" 2>&1
    # -v names each result as it comes (under xdist a SIGINT at TESTS_LIMIT seconds loses the summary)
    [ ${#workers[@]} -gt 0 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}   # 15 workers x 16 threads oversubscribe
    timeout -s INT "${TESTS_LIMIT:-540}" python3 -m pytest -m gpu "${sel[@]}" ${workers[@]+"${workers[@]}"} -v \
      -p no:cacheprovider --tb=short -rfE --durations=25 >> "$OUT/gpu_tests.log" 2>&1
    grep -E "^versions|^unsupported|FAILED|ERROR |passed|failed" "$OUT/gpu_tests.log" | sort -u | tail -40 ;;
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
    # the split family's stages / programs per SM / tile rows beside the seed (.peers) and the fused launch;
    # --check compares the first variant with the float64 reference first
    peer=()
    [ -d .peers/trtllm_replay ] && peer=(--peer .peers)
    python3 scripts/step_sweep.py ${peer[@]+"${peer[@]}"} --states fp32,bf16,fp16,int8,fp8 --batches 1,8,32,64,256,1024 \
      --check --out "$OUT" --variants '[{}, {"write":{"prefetch":true},"no_write":{"prefetch":true}}, {"write":{"prefetch":true,"stages":3},"no_write":{"prefetch":true}}, {"write":{"side_stream":true}}, {"write":{"side_stream":true,"ctas_per_sm":2},"no_write":{"ctas_per_sm":2}}, {"launch":"dynamic"}]' \
      2>&1 | tee "$OUT/sweep.log" | grep -v "^   \|Warn\|warn" ;;
  ncu)
    # per-kernel counters (occupancy, warp stalls, memory) of one eager step, ours beside the seed's (.peers)
    peer=()
    [ -d .peers/trtllm_replay ] && peer=(--peer .peers)
    st=${NCU_STATE:-bf16}; b=${NCU_BATCH:-1024}
    ncu --clock-control none --kernel-name regex:'coef_kernel|main_kernel|precompute|persistent' --launch-skip 6 \
      --launch-count 14 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats \
      python3 scripts/ncu_step.py ${peer[@]+"${peer[@]}"} --state "$st" --batch "$b" > "$OUT/ncu_${st}_b${b}.txt" 2>&1
    grep -E "^  [_A-Za-z0-9]+ \(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|DRAM Throughput|Block Limit Reg" \
      "$OUT/ncu_${st}_b${b}.txt" | head -120 ;;
  tune)
    # one resumable slice of the tuner (docs/tuning.md): Super TP8, T=6, bf16 states (TUNE_STATES), the fused launch at
    # batch 1 and the split launches at batch 1024 (TUNE_BATCHES), one descent of at most two sweeps per case.
    # Measurements stop after TUNE_BUDGET seconds (default 400: with start-up and the last request, ~8 min); the run
    # continues from out/tune/log.jsonl when that folder is carried to the next call (carry: ["out/tune"]).
    # $OUT/tune gets the log, the tuned table <card>.json and summary.md (tuned vs default).
    python3 -m specssm tune --shapes super_tp8 --states "${TUNE_STATES:-bf16}" --T 6 --batches "${TUNE_BATCHES:-1,1024}" \
      --families fused,split --restarts 0 --max-sweeps 2 --out out/tune --resume --time-budget "${TUNE_BUDGET:-400}" \
      > "$OUT/tune.log" 2>&1
    rc=$?
    mkdir -p "$OUT/tune" && cp out/tune/log.jsonl out/tune/*.json out/tune/summary.md "$OUT/tune/" 2>/dev/null
    grep -v "^\[" "$OUT/tune.log" | tail -20
    cat out/tune/summary.md 2>/dev/null
    exit $rc ;;
  materialize)
    # the fold of slot rings into fresh checkpoints (specssm/step/materialize.py): its -m gpu tests, then 1,024
    # source -> destination pairs at Super TP8, every state dtype, RN and SR (specssm/bench/materialize.py)
    python3 -m pytest -q -m gpu tests/step/test_materialize.py tests/cache/test_cache_transfer.py \
      tests/bench/test_materialize_bench.py -p no:cacheprovider > "$OUT/materialize_tests.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed" "$OUT/materialize_tests.log" | tail -10
    python3 -m specssm bench --materialize --dtypes fp32,bf16,fp16,int8,fp8 --rounding rn,sr --out "$OUT/materialize" \
      2> "$OUT/materialize_bench.log" ;;
  compiled)
    # one decode step of TinyMamba2LM 'large' (specssm/bench/compiled.py): eager, eager in a CUDA graph,
    # torch.compile(inductor) and mode="reduce-overhead", fp32 and bf16 states, batch 1, 8, 64; the page on
    # stdout and in $OUT/compiled.md, the rows in $OUT/compiled/compiled.json, compiler noise in the log
    python3 -m specssm bench --compiled --size large --batches 1,8,64 --dtypes fp32,bf16 --out "$OUT/compiled" \
      --results-md "$OUT/compiled.md" 2> "$OUT/compiled.log"
    rc=$?
    grep "^specssm bench" "$OUT/compiled.log" | tail -8
    [ $rc -eq 0 ] || tail -25 "$OUT/compiled.log"          # a traceback
    exit $rc ;;
esac
