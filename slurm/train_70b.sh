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
# Memory per 80 GB GPU with N GPUs, ZeRO-3 (every state partitioned over all N):
#   frozen text tower, bf16 weights only                     2 B/param x 70e9
#   trainable image tower: bf16 weight 2 + bf16 grad 2 +    16 B/param x 70e9
#     fp32 master 4 + Adam m 4 + Adam v 4
#   (2 x 70e9 + 16 x 70e9) / N = 1.26e12 B / N     (exact counts: 1.24e12, see the config)
#     N = 16 (2 nodes): 78.8 GB  no room for anything else
#     N = 32 (4 nodes): 39.4 GB  fits, tight with the working memory below
#     N = 64 (8 nodes): 19.7 GB  the default: comfortable, and the config's batch
#                                (2 x 2 x 64 = 256 sequences of 4096 tokens) assumes it
#   plus working memory per GPU, activation checkpointing on, micro-batch 2 x 4096 tokens:
#     checkpointed layer inputs  2 x 80 x 4096 x 8192 x 2 B         10.7 GB
#     logits + fp32 loss         2 x 4096 x 128256 x (2 + 4) B       6.3 GB
#     gathered + prefetched layer of both towers  2 x 2 x 0.86e9 x 2 B  6.8 GB
#     recomputed layer's intermediates, reduce buckets, CUDA/NCCL   ~6 GB
#   ~30 GB: ~50 GB per GPU at N = 64, ~70 GB at N = 32. Fewer than 4 nodes does not fit.
#
# The alternative: pipeline stages + ZeRO-1 (DeepSpeed's pipeline engine refuses ZeRO-2/3).
#   P stages, N = P x D; a stage keeps its 80/P layers of both towers whole, replicated
#   over its D data-parallel replicas; ZeRO-1 partitions only the optimizer states:
#     frozen bf16 2 B + trainable bf16 weight 2 B and fp32 accumulated grad 4 B, per stage:
#       (2 + 2 + 4) x 70e9 / P
#     fp32 master + Adam m, v (12 B), over all N:   12 x 70e9 / N
#   N = 64: P = 16 (5 layers a stage): 35 + 13.1 = 48 GB;  P = 8: 70 + 13.1 = 83 GB, too much.
#   Activations of the micro-batches in flight come on top; the bubble costs
#   (P - 1) / (micro-batches + P - 1) of the time, so use gradient_accumulation >= 4 P:
#     DS_CONFIG=ds_configs/pipeline_zero1.json \
#       OVERRIDES="parallel.zero_stage=1 parallel.pipeline_stages=16 train.gradient_accumulation=64" \
#       sbatch slurm/train_70b.sh

# ------------------------------------------------- defaults: the environment wins
: "${CONFIG:=configs/llama3_70b.yaml}"            # run config
: "${DS_CONFIG:=ds_configs/zero3.json}"           # DeepSpeed engine tuning (parallel.ds_config)
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
