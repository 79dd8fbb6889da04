#!/bin/bash
# LMFusion pretraining on Llama-3-8B: frozen 8B text tower + trainable 8B image tower.
#
#   sbatch slurm/train_8b.sh                                   # defaults below
#   sbatch --nodes=4 -p gpu -A myproj slurm/train_8b.sh        # site flags
#   RUN_DIR=/scratch/me/r8 TRAIN_DATA=s3://bucket/mds sbatch slurm/train_8b.sh train.steps=50000
#
# Every site value is an sbatch flag (nodes, partition, account, time) or an environment
# variable (CONFIG, DS_CONFIG, RUN_DIR, GPUS_PER_NODE, TRAIN_DATA, BASE_MODEL, OVERRIDES;
# see slurm/common.sh). Resubmitting with the same RUN_DIR resumes the run.
#
#SBATCH --job-name=mf-llama3-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#
# The job takes whole nodes; srun in slurm/common.sh starts GPUS_PER_NODE ranks on each
# (default: the --gpus-per-node allocation). USR1 comes 5 minutes before the time limit,
# time to finish a step and checkpoint before the job requeues itself.
#
# Memory per GPU under ZeRO-3: (2 B frozen bf16 + 16 B trainable) x 8e9 / N = 144 GB / N,
# 18 GB on one node of 8 GPUs, plus ~10-15 GB of activations, logits and ZeRO buffers at
# sequence 4096: one 80 GB (or 40 GB) node fits; more nodes add data-parallel throughput.

# ---------------------------------------------------------------- defaults (env wins)
: "${CONFIG:=configs/llama3_8b.yaml}"
: "${DS_CONFIG:=ds_configs/zero3.json}"
: "${RUN_DIR:=runs/llama3_8b}"
: "${GPUS_PER_NODE:=}"   # empty: the GPUs allocated per node (--gpus-per-node)
: "${TRAIN_DATA:=}"      # empty: data.train of CONFIG
: "${BASE_MODEL:=}"      # empty: model.base of CONFIG
: "${OVERRIDES:=}"       # e.g. "train.steps=50000 log.every=1"
# ---------------------------------------------------------------------------------

# Slurm runs a copy of this file from its spool directory: find the repository from the
# submitted path, the submission directory, or this file's own location.
for REPO_DIR in "${REPO_DIR:-}" \
    "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." \
    "${SLURM_SUBMIT_DIR:-}" "$(dirname "${BASH_SOURCE[0]}")/.."; do
    [[ -f $REPO_DIR/slurm/common.sh ]] && break
done
REPO_DIR=$(cd "$REPO_DIR" 2>/dev/null && pwd)
# shellcheck source=slurm/common.sh
source "$REPO_DIR/slurm/common.sh" || { echo "megafusion-slurm: error: slurm/common.sh not found; set REPO_DIR" >&2; exit 1; }
MF_SCRIPT_NAME=slurm/train_8b.sh
mf_main "$@"
