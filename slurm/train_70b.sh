#!/bin/bash
# LMFusion pretraining on Llama-3-70B: frozen 70B text tower + trainable 70B image tower.
#
#   sbatch slurm/train_70b.sh                                  # defaults below
#   sbatch --nodes=8 -p gpu -A myproj slurm/train_70b.sh       # site flags
#   RUN_DIR=/scratch/me/r70 TRAIN_DATA=s3://bucket/mds sbatch slurm/train_70b.sh train.steps=50000
#
# Every site value is an sbatch flag (nodes, partition, account, time) or an environment
# variable (CONFIG, DS_CONFIG, RUN_DIR, GPUS_PER_NODE, TRAIN_DATA, BASE_MODEL, OVERRIDES;
# see slurm/common.sh). Resubmitting with the same RUN_DIR resumes the run.
#
#SBATCH --job-name=mf-llama3-70b
#SBATCH --nodes=4
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
# The job takes whole nodes (--exclusive, --mem=0; one batch task per node); srun in
# slurm/common.sh starts GPUS_PER_NODE ranks on each (default: the --gpus-per-node
# allocation), each with --cpus-per-task = the node's CPUs / GPUS_PER_NODE. USR1 comes 10
# minutes before the time limit: time to finish a step and write a 70B checkpoint
# (~1.1 TB of trainable state in total) before the job requeues itself.
#
# Memory per GPU (80 GB), N GPUs in total, ZeRO-3 (the default below):
#   frozen text tower, bf16, partitioned:          2 B/param  x 70e9 / N
#   trainable image tower, partitioned:           16 B/param  x 70e9 / N
#     (bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam m 4 + Adam v 4)
#   states = (2*70e9 + 16*70e9) / N = 1.26e12 B / N
#     N=16:  78.8 GB  does not fit;   N=24: 52.5 GB  too tight;   N=32 (4 nodes): 39.4 GB
#   plus, with activation checkpointing (model.activation_checkpointing=true), sequence
#   4096, micro-batch 1: layer inputs kept 80 x 4096 x 8192 x 2 B = 5.4 GB; one layer
#   recomputed ~34 x 4096 x 8192 B = 1.1 GB; logits and their gradient in fp32
#   (4096 x 128256 x 4 B = 2.1 GB each, ~6 GB with softmax); ZeRO-3 gathered parameters,
#   prefetch and reduce buckets ~4-5 GB; CUDA/NCCL context ~2-3 GB: ~20 GB in all.
#   4 nodes x 8 GPUs: ~39 + ~20 = ~60 GB of 80 GB. Fewer than 4 nodes does not fit; more
#   nodes only add data-parallel throughput (keep the global batch via
#   train.gradient_accumulation).
#
# Alternative: pipeline stages + ZeRO-1 (DeepSpeed's pipeline engine allows ZeRO <= 1).
#   P stages, D = N / P data-parallel replicas per stage; a stage holds 80/P layers of
#   both towers. ZeRO-1 partitions only optimizer states (over D):
#     frozen bf16, replicated in the stage      2 x 70e9 / P
#     trainable bf16 weights + grads            4 x 70e9 / P
#     fp32 master + Adam m, v, partitioned     12 x 70e9 / (P x D)
#   N=32, P=16 (5 layers a stage), D=2: 8.8 + 17.5 + 26.3 = 52.5 GB plus activations of
#   the micro-batches in flight; P=8, D=4: 78.8 GB does not fit. Run it as
#     DS_CONFIG=ds_configs/pipeline_zero1.json \
#       OVERRIDES="parallel.zero_stage=1 parallel.pipeline_stages=16" sbatch slurm/train_70b.sh

# ---------------------------------------------------------------- defaults (env wins)
: "${CONFIG:=configs/llama3_70b.yaml}"
: "${DS_CONFIG:=ds_configs/zero3.json}"
: "${RUN_DIR:=runs/llama3_70b}"
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
MF_SCRIPT_NAME=slurm/train_70b.sh
mf_main "$@"
