#!/usr/bin/env bash
# Every GPU benchmark of the project in one run (< 8 minutes of GPU time on an H100-class card): the inference
# grid (precision x decoder x images per call), one-image latency (CUDA graphs, torch.compile reduce-overhead),
# the pipeline's overhead with cached prompts, and the training step of train_adapter.py at SD2 size.
# JSON results go to benchmarks/performance/results/<gpu name>/ (copy the tables into RESULTS.md with the machine).
#
#   bash benchmarks/performance/gpu_suite.sh            # on a machine with a GPU
#   bash benchmarks/performance/gpu_suite.sh --smoke    # every command on the CPU at tiny size (checks the script, ~5 min)
#
# Each command runs under its own time limit (the limits add up to 470 s); one that fails or runs out is
# reported and the suite goes on, so one broken benchmark costs its slot, not the run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"  # the repository: benchmarks run as modules from it
cd "$ROOT"
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; fi

if [[ $SMOKE == 1 ]]; then
  GPU="cpu-smoke"
  OUT="${OUT_DIR:-$(mktemp -d)}"
  DEVICE=cpu; CONFIG=tiny; RES=64; TRAIN_RES=64; REPEATS=1; LIMIT_SCALE=3
  THROUGHPUT_VARIANTS=(fp32 bf16); LATENCY_VARIANTS=(bf16); IMAGES=(1 2); TRAIN_BATCHES=(1)
  DATASET_ARGS=(--num_images 8 --batch_images 4 --batch_size 8 --repeats 1)
else
  if ! command -v nvidia-smi >/dev/null; then echo "no nvidia-smi: run with --smoke on a machine without a GPU" >&2; exit 1; fi
  GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9\n' '_' | sed 's/_*$//')"
  OUT="${OUT_DIR:-benchmarks/performance/results/$GPU}"
  DEVICE=cuda; CONFIG=sd2; RES=512; TRAIN_RES=512; REPEATS=5; LIMIT_SCALE=1
  THROUGHPUT_VARIANTS=(fp32 fp16 bf16 bf16+channels_last); LATENCY_VARIANTS=(bf16 bf16+cuda_graphs bf16+compile_ro)
  IMAGES=(1 8 32); TRAIN_BATCHES=(1 4)
  DATASET_ARGS=(--num_images 1000 --batch_images 16 --batch_size 64 --repeats 1)  # one process: one GPU here
fi
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
FAILED=()
START=$SECONDS

run() {  # run NAME LIMIT_SECONDS COMMAND...: one benchmark, its log next to its JSON
  local name=$1 limit=$(( $2 * LIMIT_SCALE )); shift 2
  echo "=== $name (limit ${limit}s, $(( SECONDS - START ))s into the suite)"
  if timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
    :
  else
    FAILED+=("$name"); echo "!!! $name failed or ran out of time (see $OUT/$name.log)"
  fi
}

{ nvidia-smi 2>/dev/null || true; python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/machine.txt"

# 1. Inference grid: precision x decoder x images per call (one prompt per image, 1 step).
run throughput 150 python -m benchmarks.performance.bench_throughput --config $CONFIG --resolution $RES --device $DEVICE \
  --variants "${THROUGHPUT_VARIANTS[@]}" --images_per_call "${IMAGES[@]}" --repeats $REPEATS \
  --output "$OUT/throughput.json"

# 2. One image per call: the host-bound case, with CUDA graphs / torch.compile reduce-overhead (light decoder).
run latency 120 python -m benchmarks.performance.bench_throughput --config $CONFIG --resolution $RES --device $DEVICE \
  --variants "${LATENCY_VARIANTS[@]}" --decoders light --images_per_call 1 "${IMAGES[-1]}" --repeats $(( REPEATS * 2 )) \
  --output "$OUT/latency.json"

# 3. What a call costs over its component calls, with its prompt embedding cached.
run pipeline_overhead 30 python -m benchmarks.performance.bench_pipeline_overhead --config $CONFIG --resolution $RES --k 1 \
  --device $DEVICE --dtype bf16 --repeats $(( REPEATS * 4 )) --flops_resolution $RES --output "$OUT/pipeline_overhead.json"

# 4. Training throughput of train_adapter.py's step: LoRA / full, checkpointing, cached latents, batch sizes.
run training_throughput 120 python -m benchmarks.performance.bench_training_throughput --config $CONFIG --resolution $TRAIN_RES \
  --device $DEVICE --batch_sizes "${TRAIN_BATCHES[@]}" --repeats $(( REPEATS > 3 ? 3 : REPEATS )) --estimate_resolution 0 \
  --output "$OUT/training_throughput.json"

# 5. Whole-dataset inference, when that benchmark exists in this checkout.
run dataset_inference 50 python -m benchmarks.performance.bench_dataset_inference --device $DEVICE --processes 1 \
  "${DATASET_ARGS[@]}" --output "$OUT/dataset_inference.json"

echo "suite done in $(( SECONDS - START ))s; results in $OUT"
if (( ${#FAILED[@]} )); then echo "failed: ${FAILED[*]}"; exit 1; fi
