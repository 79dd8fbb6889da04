#!/bin/bash
# LMFusion pretraining on Llama-3-70B: frozen 70B text tower + trainable 70B image tower,
# ZeRO-3 with activation checkpointing on 80 GB GPUs (configs/llama3_70b.yaml).
#
#   sbatch slurm/train_70b.sh                                    # the defaults below
#   sbatch --nodes=16 --partition=gpu --account=proj slurm/train_70b.sh
#   RUN_DIR=/scratch/me/r70 LLAMA3_70B=/models/llama3-70b sbatch slurm/train_70b.sh train.steps=50000
#
# Site values are sbatch flags (--nodes, --partition, --account, --time, ...) or
# environment variables (the block below; slurm/common.sh describes each). Resubmitting
# with the same RUN_DIR resumes the run; USR1 before the time limit checkpoints it and
# requeues the job, which resumes by itself.
#
#SBATCH --job-name=mf-llama3-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#
# The job takes whole nodes (--exclusive, --mem=0, one batch task per node); srun in
# slurm/common.sh then starts GPUS_PER_NODE ranks on each (default: the --gpus-per-node
# allocation) with --cpus-per-task = the node's CPUs / GPUS_PER_NODE. USR1 comes 10
# minutes before the limit: time to finish a step and write ~1.1 TB of trainable state.
# --open-mode=append keeps the log of every requeued attempt in the same file.
#
# Memory, communication and speed per setting: python tools/plan.py --config
# configs/llama3_70b.yaml --nodes N (README: "Planning a run"). On the default 8 nodes the
# config's ZeRO-3 + ZeRO++ qwZ needs ~60 GB per 80 GB GPU and is network-bound (estimated
# MFU 27.5%); from 16 nodes on, micro-batch 4 fits and the step becomes compute-bound (~41%):
#     OVERRIDES="train.micro_batch_size=4 train.gradient_accumulation=1" sbatch --nodes=16 slurm/train_70b.sh
# qwZ runs on 4, 8 or 16 nodes of 8 GPUs, not on 6 or 12 (a rank's share of a weight must
# be a multiple of 8 elements): there the planner names a setting without it.
# The planner also prices pipeline stages + ZeRO-1 (DS_CONFIG=ds_configs/pipeline_zero1.json
# OVERRIDES="parallel.zero_stage=1 parallel.pipeline_stages=16 ..."), which do not fit
# 80 GB GPUs at 70B on 8 nodes.

# ------------------------------------------------- defaults: the environment wins
: "${CONFIG:=configs/llama3_70b.yaml}"            # run config
: "${DS_CONFIG:=}"                                # DeepSpeed JSON; empty: the config's parallel.ds_config
: "${RUN_DIR:=${MEGAFUSION_RUNS:-runs}/llama3_70b}"   # run.dir: checkpoints/, tensorboard/
: "${GPUS_PER_NODE:=}"                            # ranks per node; empty: --gpus-per-node
: "${OVERRIDES:=}"                                # more section.key=value pairs for the trainer
# Paths that CONFIG reads from the environment (same defaults as the config):
export LLAMA3_70B=${LLAMA3_70B:-/models/Meta-Llama-3-70B}       # model.base (HF directory)
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
MF_SCRIPT_NAME=slurm/train_70b.sh
mf_main "$@"
