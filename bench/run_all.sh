#!/usr/bin/env bash
# Every GPU benchmark of bench/README.md in one command, JSON into one folder:
#   bash bench/run_all.sh OUT_DIR [main|compile|cold|all]
# main   : bench.py (W1 cold/warm/baseline/presets, with/without CUDA graphs, avatar cache, memory per batch,
#          micro, landmarks), encoder_bench.py (CPU encoder alone) and probes/graph_memory.py (memory with and
#          without CUDA graphs per batch)
# compile: every W1 run compiled, then eager in the same process (bench.py --compile; run 21's command),
#          compile_bench.py (models alone), probes/gpu_floor.py (op floors, compile variants per model) and
#          probes/encoder_w1.py (W1 with DWPose, new and from the avatar cache, when the first frame reaches the
#          encoder; `medium` and `veryfast`)
# cold   : cold_start.py (page cache dropped before every run; needs root)
# Each part writes <name>.json and <name>.log; a failing part does not stop the others.
set -u
out=${1:?usage: bash bench/run_all.sh OUT_DIR [main|compile|cold|all]}
part=${2:-all}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
models=${MUSETALK_BENCH_MODELS:-/tmp/musetalk-bench-models}
py=${PYTHON:-python3}
step() {  # name, command...
  local name=$1; shift
  echo "== $name: $*" >&2
  local t=$SECONDS
  "$@" >"$out/$name.json" 2>"$out/$name.log"
  echo "== $name: exit $? in $((SECONDS - t)) s" >&2
}
if [[ $part == main || $part == all ]]; then
  step encoder "$py" "$here/encoder_bench.py"
  "$py" "$here/bench.py" --media "$here/../.bench/media" --models "$models" --out "$out/bench.json" \
    --channels-last 0 --cudnn-compare 0 --encoder-micro 0 --landmark-batches 4 \
    >"$out/bench.log" 2>&1
  echo "== bench: exit $?" >&2
  "$py" "$here/probes/graph_memory.py" --models "$models" --out "$out/graph_memory.json" >"$out/graph_memory.log" 2>&1
  echo "== graph_memory: exit $?" >&2
fi
if [[ $part == compile || $part == all ]]; then
  "$py" "$here/bench.py" --media "$here/../.bench/media" --models "$models" --out "$out/bench_compiled.json" \
    --compile "${MUSETALK_BENCH_COMPILE:-regional}" --cache-presets veryfast,medium --memory-batches --baseline 0 \
    --channels-last 0 --cudnn-compare 0 --encoder-micro 0 --landmark-batches 4 >"$out/bench_compiled.log" 2>&1
  echo "== bench --compile: exit $?" >&2
  step compile "$py" "$here/compile_bench.py" --models "$models" --budget-s "${MUSETALK_BENCH_COMPILE_BUDGET:-180}"
  "$py" "$here/probes/gpu_floor.py" --out "$out/gpu_floor.json" >"$out/gpu_floor.log" 2>&1
  echo "== gpu_floor: exit $?" >&2
  for preset in veryfast medium; do
    "$py" "$here/probes/encoder_w1.py" --models "$models" --compile "${MUSETALK_BENCH_COMPILE:-regional}" \
      --preset "$preset" --rounds 2 --out "$out/encoder_w1_$preset.json" >"$out/encoder_w1_$preset.log" 2>&1
    echo "== encoder_w1 $preset: exit $?" >&2
  done
fi
if [[ $part == cold || $part == all ]]; then
  step cold_start "$py" "$here/cold_start.py" --models-dir "$models" --convert --repeats 3 --drop-caches
fi
