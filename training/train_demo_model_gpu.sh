#!/usr/bin/env bash
# One short GPU run of the demo model's recipe (issue 21), prepared so that a lent GPU is used in one command:
# fine-tune the shipped demo model on `varied` scenes at a GPU-sized batch, then score it the way the CPU runs are
# scored (the 100-scene benchmark, plain and style-shifted, at 1x1 / 4x1 / 4x2).
#
#   bash training/train_demo_model_gpu.sh [WORK_DIR]          # on a machine with a GPU (~8 min on an H100-class card)
#   bash training/train_demo_model_gpu.sh --smoke [WORK_DIR]  # every stage on the CPU at toy size (checks the script)
#
# Why these settings: this 3.7 M-parameter U-Net is overhead-bound on a GPU (~8-10 steps/s on an H100 at batch 32
# or 128, hub_cards/demo_model_card.md), so a GPU buys batch size, not steps: batch 256 for 3000 steps is ~3x the
# samples of the longest CPU run. The learning rate grows with the square root of the batch (1e-3 at 32).
# Everything is written under WORK_DIR; run the same command again to resume from the last checkpoint. To ship
# the result: `python training/train_demo_model.py ...the same arguments... --install`, then the steps in
# hub_cards/demo_model_card.md ("Training procedure").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
WORK="${1:-runs/gpu_demo}"
mkdir -p "$WORK"

if [[ $SMOKE == 1 ]]; then
  SCENES=64; STEPS=4; BATCH=8; LR=1e-3; CHECKPOINT=2; VALIDATE=4; EVAL_SCENES=2
else
  if ! command -v nvidia-smi >/dev/null; then echo "no nvidia-smi: run with --smoke on a machine without a GPU" >&2; exit 1; fi
  SCENES=20000; STEPS="${STEPS:-3000}"; BATCH="${BATCH:-256}"; LR="${LR:-2.8e-3}"; CHECKPOINT=500; VALIDATE=1000; EVAL_SCENES=100
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
START=$SECONDS

# Scenes are drawn on the CPU; a data folder carried to the machine (same count and style) is reused as it is.
python training/train_demo_model.py --work_dir "$WORK" --init_model digseg-demo \
  --data_dir "$WORK/data_varied" --train_style varied --num_train_images $SCENES \
  --unet_steps $STEPS --batch_size $BATCH --learning_rate $LR --lr_warmup_steps $(( STEPS / 20 + 1 )) \
  --loss latent --prompts_per_image 1 --checkpointing_steps $CHECKPOINT --validation_steps $VALIDATE --seed 0
echo "=== trained in $(( SECONDS - START )) s"

for style in plain shifted; do
  python -m benchmarks.quality.demo_fidelity --model "$WORK/unet/pipeline" --style $style --num_scenes $EVAL_SCENES \
    --settings 1x1 4x1 4x2 --no_curve | tee "$WORK/fidelity_$style.txt"
done
echo "=== done in $(( SECONDS - START )) s; pipeline: $WORK/unet/pipeline"
