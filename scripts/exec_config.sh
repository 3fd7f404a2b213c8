#!/bin/bash
# Multi-node training under Slurm: the seed README's exec_config.sh, adapted to this repository.
#
#   cd /path/to/repavit && sbatch scripts/exec_config.sh
#
# --nodes x --ntasks-per-node processes (one per GPU: --gres must equal --ntasks-per-node). The global
# batch BATCH_SIZE is split evenly over them, as in the seed. Each setting below can be overridden
# from the environment, e.g. `MODEL=RePaViT_Base LR=4e-3 MIN_LR=4e-5 DROP_PATH=0.1 sbatch scripts/exec_config.sh`.
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=2
#SBATCH --partition=gpu
#SBATCH --gres=gpu:2
#SBATCH --cpus-per-task=32
#SBATCH --mem-per-cpu=2G
#SBATCH --job-name=train
#SBATCH --time=1-00:00:00
#SBATCH -o RePaViT_Large_out.txt
#SBATCH -e RePaViT_Large_err.txt
# Preemption and time limits: Slurm sends SIGUSR1 to every task 180 s before the limit (and SIGTERM on
# preemption); training saves a checkpoint at the next step boundary (its position in the epoch included)
# and exits with 128 + the signal number. This script then requeues the job, which continues with
# --resume auto from exactly where it stopped.
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

# Load modules / activate the environment here if needed (e.g. `module load miniconda3`,
# `conda activate repavit` or `source .venv/bin/activate`).

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}   # sbatch runs a copy of this file: locate main.py via the submit dir
MODEL=${MODEL:-RePaViT_Large}
DATA_PATH=${DATA_PATH:-/path/to/imagenet}
OUTPUT_DIR=${OUTPUT_DIR:-output/${MODEL}}
EPOCHS=${EPOCHS:-300}
NUM_WORKERS=${NUM_WORKERS:-20}
LR=${LR:-1e-3}
MIN_LR=${MIN_LR:-5e-5}
DROP_PATH=${DROP_PATH:-0.3}
EXTRA_ARGS=${EXTRA_ARGS:-}   # e.g. "--wandb_entity=your-entity-name --wandb_suffix=your-suffix"

export BATCH_SIZE=${BATCH_SIZE:-4096}   # global batch
export MASTER_PORT=${MASTER_PORT:-22222}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export WORLD_SIZE=$SLURM_NTASKS
if (( BATCH_SIZE % WORLD_SIZE != 0 )); then
    echo "exec_config.sh: global batch $BATCH_SIZE is not divisible by $WORLD_SIZE processes" >&2
    exit 2
fi
export BATCH_SIZE=$(( BATCH_SIZE / WORLD_SIZE ))   # per process
export WANDB_MODE=${WANDB_MODE:-online}

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
set +e
srun --export=ALL python "$REPO/main.py" \
    --model="$MODEL" \
    --batch_size="$BATCH_SIZE" \
    --epochs="$EPOCHS" \
    --num_workers="$NUM_WORKERS" \
    --dist_eval \
    --channel_idle \
    --idle_ratio=0.75 \
    --feature_norm=BatchNorm \
    --data_path="$DATA_PATH" \
    --output_dir="$OUTPUT_DIR" \
    --opt=lamb \
    --lr="$LR" \
    --min_lr="$MIN_LR" \
    --warmup_lr=1e-6 \
    --warmup_epochs=20 \
    --unscale_lr \
    --weight_decay=0.05 \
    --drop_path="$DROP_PATH" \
    --wandb \
    --resume=auto \
    $EXTRA_ARGS
rc=$?
set -e
if (( rc == 128 + 10 || rc == 128 + 15 )); then   # stopped by SIGUSR1 / SIGTERM after saving its position
    echo "exec_config.sh: training stopped by a signal and saved; requeueing job ${SLURM_JOB_ID:-?}" >&2
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "$rc"
