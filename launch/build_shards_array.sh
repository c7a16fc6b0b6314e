#!/bin/bash
# Latent precompute as a SLURM array: each array task is one rank of a parts build
# (python -m magitrain.data_pipeline.build_shards --rank R --world-size W). Copy this file, edit the
# #SBATCH lines, then e.g. (MAGI-1's VAE and T5, 8 tasks of one GPU each):
#
#   sbatch --array=0-7 launch/build_shards_array.sh /data/videos /data/shards \
#       --size 480x832 --max-frames 96 --latent-encoder magi1-vae --encoder-weights downloads/vae \
#       --text-encoder t5 --text-weights downloads/t5_pretrained
#
# Arguments: SRC OUT, then build_shards flags (passed as is). Task i builds the parts p with
# p % W == i (W = the array's task count); the task that finishes last writes OUT/manifest.json.
# Resumable: resubmit the same command (any array size) after a failure, a kill or a time limit; the
# parts already done (OUT/parts/part-*.json) are skipped. PYTHON: the interpreter (default: python).
#
#SBATCH --job-name=magitrain-shards
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "error: usage: sbatch --array=0-N $0 SRC OUT [build_shards flags...]" >&2
    exit 2
fi
: "${SLURM_ARRAY_TASK_ID:?error: not an array task (submit with sbatch --array=0-N)}"
: "${SLURM_ARRAY_TASK_COUNT:?error: SLURM_ARRAY_TASK_COUNT is not set}"
SRC=$1
OUT=$2
shift 2
RANK=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
exec "${PYTHON:-python}" -m magitrain.data_pipeline.build_shards "$SRC" "$OUT" \
    --rank "$RANK" --world-size "$SLURM_ARRAY_TASK_COUNT" --quiet "$@"
