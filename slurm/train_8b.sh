#!/bin/bash
# LMFusion pretraining on Llama-3-8B: frozen 8B text tower + trainable 8B image tower,
# ZeRO-3 with activation checkpointing (configs/llama3_8b.yaml).
#
#   sbatch slurm/train_8b.sh                                     # the defaults below
#   sbatch --nodes=8 --partition=gpu --account=proj slurm/train_8b.sh
#   RUN_DIR=/scratch/me/r8 LLAMA3_8B=/models/llama3-8b sbatch slurm/train_8b.sh train.steps=50000
#
# Site values are sbatch flags (--nodes, --partition, --account, --time, ...) or
# environment variables (the block below; slurm/common.sh describes each). Resubmitting
# with the same RUN_DIR resumes the run; USR1 before the time limit checkpoints it and
# requeues the job, which resumes by itself.
#
#SBATCH --job-name=mf-llama3-8b
#SBATCH --nodes=4
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
# The job takes whole nodes (--exclusive, --mem=0, one batch task per node); srun in
# slurm/common.sh then starts GPUS_PER_NODE ranks on each (default: the --gpus-per-node
# allocation) with --cpus-per-task = the node's CPUs / GPUS_PER_NODE. USR1 comes 5
# minutes before the limit, time to finish a step and checkpoint.
#
# Memory, communication and speed per setting: python tools/plan.py --config
# configs/llama3_8b.yaml --nodes N (README: "Planning a run"). On the default 4 nodes the
# config's setting (ZeRO-3, two-layer buckets, micro-batch 8) needs ~53 GB per 80 GB GPU
# and is compute-bound (estimated MFU 41.7%).

# ------------------------------------------------- defaults: the environment wins
: "${CONFIG:=configs/llama3_8b.yaml}"             # run config
: "${DS_CONFIG:=}"                                # DeepSpeed JSON; empty: the config's parallel.ds_config
: "${RUN_DIR:=${MEGAFUSION_RUNS:-runs}/llama3_8b}"    # run.dir: checkpoints/, tensorboard/
: "${GPUS_PER_NODE:=}"                            # ranks per node; empty: --gpus-per-node
: "${OVERRIDES:=}"                                # more section.key=value pairs for the trainer
# Paths that CONFIG reads from the environment (same defaults as the config):
export LLAMA3_8B=${LLAMA3_8B:-/models/Meta-Llama-3-8B}          # model.base (HF directory)
export VAE_PATH=${VAE_PATH:-/models/vae}                         # model.vae_path
export MEGAFUSION_TRAIN_DATA=${MEGAFUSION_TRAIN_DATA:-/datasets/megafusion/image-caption-256/train}
export MEGAFUSION_VAL_DATA=${MEGAFUSION_VAL_DATA:-/datasets/megafusion/image-caption-256/val}
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
