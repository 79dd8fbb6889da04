# shellcheck shell=bash
# Shared body of slurm/train_*.sh; sourced after a script has set its defaults.
#
# What it does, in order:
#   1. resolves CONFIG, DS_CONFIG, TRAIN_ENTRY, RUN_DIR and the Python interpreter, and
#      fails with one line naming the culprit when one is missing;
#   2. derives the rank layout from the allocation: GPUS_PER_NODE ranks on each of the
#      job's nodes, MASTER_ADDR = address of the first node, MASTER_PORT from the job id;
#   3. launches one srun task per rank, each exporting RANK, LOCAL_RANK, WORLD_SIZE,
#      LOCAL_WORLD_SIZE (what DeepSpeed, torch.distributed and mosaicml-streaming read);
#   4. turns SIGUSR1/SIGTERM sent to the batch shell (#SBATCH --signal=B:USR1@..., or
#      `scancel --signal=USR1 --batch JOBID`) into SIGUSR1 for every rank: the trainer
#      saves a checkpoint at the next step boundary and exits 0;
#   5. then requeues the job (`scontrol requeue`): the rerun has the same job id and
#      environment, so it finds the same RUN_DIR and resumes from its latest checkpoint;
#   6. when the ranks fail on their own (a crash: NCCL timeout, GPU fault, OOM kill),
#      requeues the job too, but only if this attempt moved the latest checkpoint
#      forward and at most MAX_CRASH_REQUEUES times per job: a run that crashes before
#      its first new checkpoint (bad config, broken node, a deterministic bug) fails
#      instead of looping.
#
# Variables (set in the environment of `sbatch`; the scripts set the defaults; data and
# base-model paths are environment variables that CONFIG itself reads, such as
# MEGAFUSION_TRAIN_DATA and LLAMA3_70B, and sbatch passes the environment on):
#   CONFIG         run config YAML (configs/llama3_70b.yaml ...)
#   DS_CONFIG      DeepSpeed engine JSON, passed as parallel.ds_config (default: the
#                  run config's own parallel.ds_config)
#   RUN_DIR        run directory (checkpoints/, tensorboard/), passed as run.dir
#   GPUS_PER_NODE  ranks per node; default: the GPUs Slurm allocated per node
#                  (--gpus-per-node), else 1. On a CPU cluster: CPU ranks per node.
#   OVERRIDES      extra section.key=value pairs, split on whitespace (write lists
#                  without spaces: train.betas=[0.9,0.95]); arguments given to the
#                  script after its name (sbatch slurm/train_8b.sh train.steps=10) are
#                  appended after them, and later pairs win.
#   PYTHON         interpreter; default: `python` of an active venv/conda env, else the
#                  repository's .venv, else python3
#   TRAIN_ENTRY    trainer script; default megafusion/train.py (tests swap in a stub)
#   CPUS_PER_RANK  --cpus-per-task of each rank; default: CPUs of the node / ranks per node
#   DS_ACCELERATOR exported as cpu when the node has no GPU (DeepSpeed's CPU accelerator)
#   MAX_CRASH_REQUEUES, NCCL_*, TORCH_NCCL_*: the site defaults block below.
#
# The collective timeout (how long a rank waits in an all-reduce for a dead peer) is a
# run-config value, parallel.collective_timeout_minutes.

# ----------------------------------------------- site defaults: the environment wins
# Crash requeues per job (0: none). Each needs progress: a new checkpoint since the
# attempt started.
: "${MAX_CRASH_REQUEUES:=3}"
# A failed or timed-out NCCL collective raises and ends the rank (torch >= 2.2 reads the
# TORCH_ name, older releases the other) instead of leaving every GPU spinning until the
# time limit; the crash requeue above then restarts from the last checkpoint.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${NCCL_ASYNC_ERROR_HANDLING:=1}"
# InfiniBand: retransmission timeout 4.096 us x 2^22 (about 17 s) and 7 retries, so a
# congested or flapping link at hundreds of GPUs is retried rather than fatal.
: "${NCCL_IB_TIMEOUT:=22}"
: "${NCCL_IB_RETRY_CNT:=7}"
: "${NCCL_DEBUG:=WARN}"  # NCCL's own warnings in the job log; INFO when debugging
export TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_DEBUG
# Fabric-specific, no portable default; set them here or in the environment of sbatch:
#   NCCL_SOCKET_IFNAME (bootstrap interface, e.g. ^lo,docker), NCCL_IB_HCA (e.g. mlx5),
#   NCCL_IB_GID_INDEX (RoCE), NCCL_IB_SL / NCCL_IB_TC (fabric QoS).
# ------------------------------------------------------------------------------------

mf_log() { printf '[megafusion-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
mf_die() { printf 'megafusion-slurm: error: %s\n' "$*" >&2; exit 1; }

# A path as given if it exists relative to the working directory, else relative to the
# repository (so `sbatch /path/to/repo/slurm/train_8b.sh` works from anywhere).
mf_resolve() {
    local path=$1
    if [[ $path != /* && ! -e $path && -e $REPO_DIR/$path ]]; then
        path=$REPO_DIR/$path
    fi
    [[ -e $path ]] || return 1
    (cd "$(dirname "$path")" && printf '%s/%s\n' "$(pwd)" "$(basename "$path")")
}

mf_pick_python() {
    if [[ -n ${PYTHON:-} ]]; then
        :
    elif [[ -n ${VIRTUAL_ENV:-} || -n ${CONDA_PREFIX:-} ]]; then
        PYTHON=python
    elif [[ -x $REPO_DIR/.venv/bin/python ]]; then
        PYTHON=$REPO_DIR/.venv/bin/python
    else
        PYTHON=python3
    fi
    command -v "$PYTHON" >/dev/null || mf_die "PYTHON=$PYTHON: no such interpreter"
}

# GPUs Slurm allocated per node: SLURM_GPUS_PER_NODE is "8" or "h100:8" (0 or unset on a
# CPU allocation).
mf_allocated_gpus() {
    local gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
    gpus=${gpus##*:}
    [[ $gpus =~ ^[0-9]+$ ]] || gpus=0
    echo "$gpus"
}

mf_has_gpu() {
    { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } || [[ -e /dev/kfd ]]
}

# The rendezvous port, a function of the job id: stable across requeues, and two jobs
# sharing a node rarely collide. 20000-29999 lies below Linux's ephemeral range
# (32768-60999), from which the kernel hands out every outgoing connection's local port
# (NCCL's and gloo's thousands of sockets among them): a port there can already be taken
# when rank 0 binds it.
mf_master_port() {
    echo $(( 20000 + $1 % 10000 ))
}

mf_setup() {
    [[ -n ${SLURM_JOB_ID:-} ]] || mf_die "not inside a Slurm job; submit with: sbatch ${MF_SCRIPT_NAME:-slurm/train_8b.sh}"

    local path
    path=$(mf_resolve "$CONFIG") || mf_die "CONFIG=$CONFIG: no such file"
    CONFIG=$path
    if [[ -n ${DS_CONFIG:-} ]]; then
        path=$(mf_resolve "$DS_CONFIG") || mf_die "DS_CONFIG=$DS_CONFIG: no such file"
        DS_CONFIG=$path
    fi
    TRAIN_ENTRY=${TRAIN_ENTRY:-megafusion/train.py}
    path=$(mf_resolve "$TRAIN_ENTRY") || mf_die "TRAIN_ENTRY=$TRAIN_ENTRY: no such file"
    TRAIN_ENTRY=$path
    [[ -n $RUN_DIR ]] || mf_die "RUN_DIR is empty"
    mkdir -p "$RUN_DIR" || mf_die "RUN_DIR=$RUN_DIR: cannot create"
    RUN_DIR=$(cd "$RUN_DIR" && pwd)
    mf_pick_python

    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        GPUS_PER_NODE=$(mf_allocated_gpus)
        if (( GPUS_PER_NODE == 0 )); then
            GPUS_PER_NODE=1
            mf_log "no GPUs allocated and GPUS_PER_NODE unset: one rank per node"
        fi
    fi
    [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || mf_die "GPUS_PER_NODE=$GPUS_PER_NODE: expected a positive integer"
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    CPUS_PER_RANK=${CPUS_PER_RANK:-$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))}

    # Rendezvous: rank 0 runs on the first node of the allocation. Its NodeAddr is the
    # address Slurm itself reaches it at (equal to the node name unless slurm.conf says
    # otherwise).
    local first addr
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node "$first" -o 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
    export MASTER_ADDR=${addr:-$first}
    MASTER_PORT=$(mf_master_port "$SLURM_JOB_ID")
    export MASTER_PORT

    export WORLD_SIZE=$(( NNODES * GPUS_PER_NODE ))
    export LOCAL_WORLD_SIZE=$GPUS_PER_NODE
    export LOCAL_SIZE=$GPUS_PER_NODE  # the deepspeed launcher's name for it
    export NNODES GPUS_PER_NODE RUN_DIR
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_RANK}
    if [[ -z ${DS_ACCELERATOR:-} ]] && ! mf_has_gpu; then
        export DS_ACCELERATOR=cpu
    fi
    # `python megafusion/train.py` puts megafusion/ first on sys.path, not the repo.
    export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}

    MF_ARGS=(--config "$CONFIG" "run.dir=$RUN_DIR")
    # The run config names its DeepSpeed JSON (tools/plan.py's choice); DS_CONFIG overrides it.
    [[ -n ${DS_CONFIG:-} ]] && MF_ARGS+=("parallel.ds_config=$DS_CONFIG")
    local -a extra=()
    read -r -a extra <<< "${OVERRIDES:-}"  # whitespace split, no globbing of [..]
    MF_ARGS+=("${extra[@]}" "$@")
}

# Signals to the batch shell: remember, and pass SIGUSR1 to the ranks through srun
# (srun forwards USR1 to its tasks; a SIGTERM to srun would make it SIGKILL them).
MF_SIGNAL=
MF_SRUN_PID=
MF_INTERRUPTED=
mf_on_signal() {
    MF_SIGNAL=$1
    MF_INTERRUPTED=1
    mf_log "got SIG$1: asking the ranks to checkpoint and exit"
    if [[ -n $MF_SRUN_PID ]]; then
        kill -USR1 "$MF_SRUN_PID" 2>/dev/null || true
    fi
}

# DeepSpeed's CPU shared-memory allreduce leaves 69 MB buffers per rank in /dev/shm,
# named after the rendezvous; remove this job's on every node (GPU runs make none).
mf_clean_shm() {
    [[ ${DS_ACCELERATOR:-} == cpu ]] || return 0
    # shellcheck disable=SC2016  # expanded by the task's shell
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task=1 --overlap \
        bash -c 'rm -f /dev/shm/deepspeed_*_"$1"_"$2"_*' megafusion-clean "$MASTER_ADDR" "$MASTER_PORT" || true
}

mf_requeue() {
    mf_log "requeueing job $SLURM_JOB_ID; the rerun resumes from $RUN_DIR/checkpoints"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    mf_log "scontrol requeue failed; resubmit this script with the same RUN_DIR to resume"
    exit 1
}

# Step of RUN_DIR's latest complete checkpoint (the trainer's `latest` names
# global_step<N>), -1 when there is none.
mf_latest_step() {
    local tag
    tag=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null) || { echo -1; return; }
    [[ $tag =~ ^global_step([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}" || echo -1
}

# Crash requeues this job has had: RUN_DIR/slurm_crash_requeues holds "JOBID COUNT"
# (a new job, such as a resubmission, starts from 0). A file, because a requeued job
# keeps the environment it was submitted with.
mf_crash_requeues() {
    local job count
    read -r job count 2>/dev/null < "$RUN_DIR/slurm_crash_requeues" || true
    [[ $job == "$SLURM_JOB_ID" && $count =~ ^[0-9]+$ ]] && echo "$count" || echo 0
}

# The ranks failed without being asked to stop: requeue when this attempt made progress
# (a newer checkpoint than when it started) and the job has requeues left; else fail.
mf_after_crash() {
    local rc=$1 before=$2 after used
    after=$(mf_latest_step)
    used=$(mf_crash_requeues)
    if (( after <= before )); then
        mf_log "ranks failed with status $rc and wrote no new checkpoint (latest step $before before and after); not requeueing"
        exit "$rc"
    fi
    if (( used >= MAX_CRASH_REQUEUES )); then
        mf_log "ranks failed with status $rc after progress (checkpoint step $before -> $after), but the job has had $used crash requeue(s), MAX_CRASH_REQUEUES=$MAX_CRASH_REQUEUES; not requeueing"
        exit "$rc"
    fi
    printf '%s %s\n' "$SLURM_JOB_ID" $(( used + 1 )) > "$RUN_DIR/slurm_crash_requeues"
    mf_log "ranks failed with status $rc after progress (checkpoint step $before -> $after): crash requeue $(( used + 1 )) of $MAX_CRASH_REQUEUES"
    mf_requeue
}

mf_main() {
    trap 'mf_on_signal USR1' USR1
    trap 'mf_on_signal TERM' TERM
    mf_setup "$@"

    mf_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $NNODES node(s) x $GPUS_PER_NODE rank(s), world size $WORLD_SIZE, $CPUS_PER_RANK CPU(s) per rank"
    mf_log "rendezvous $MASTER_ADDR:$MASTER_PORT; DS_ACCELERATOR=${DS_ACCELERATOR:-auto}; run dir $RUN_DIR"
    mf_log "command: $PYTHON $TRAIN_ENTRY ${MF_ARGS[*]}"
    if [[ -n $MF_SIGNAL ]]; then
        mf_requeue  # signalled before the ranks started: nothing to save
    fi

    local before
    before=$(mf_latest_step)

    # One task per rank, numbered node by node (--distribution=block), as
    # mosaicml-streaming expects. RANK and LOCAL_RANK differ per task, so each task
    # exports them itself before becoming the trainer.
    # shellcheck disable=SC2016  # expanded by the task's shell
    srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$GPUS_PER_NODE" \
        --cpus-per-task="$CPUS_PER_RANK" --distribution=block --kill-on-bad-exit=1 --label \
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID
                 echo "[megafusion-slurm] rank $RANK of $WORLD_SIZE (local $LOCAL_RANK) on $SLURMD_NODENAME"
                 exec "$@"' \
        megafusion-rank "$PYTHON" "$TRAIN_ENTRY" "${MF_ARGS[@]}" &
    MF_SRUN_PID=$!

    # `wait` returns early (status > 128) when a trapped signal arrives: wait again
    # until it returns srun's own status (bash keeps it after reaping srun).
    local rc
    while :; do
        MF_INTERRUPTED=
        wait "$MF_SRUN_PID"
        rc=$?
        [[ -n $MF_INTERRUPTED ]] || break
    done
    MF_SRUN_PID=
    mf_clean_shm

    if [[ -n $MF_SIGNAL ]]; then
        if (( rc == 0 )); then
            mf_requeue
        fi
        mf_log "ranks exited with status $rc after SIG$MF_SIGNAL; not requeueing"
        exit "$rc"
    fi
    if (( rc != 0 )); then
        mf_after_crash "$rc" "$before"
    fi
    mf_log "ranks finished with status $rc"
    exit "$rc"
}
