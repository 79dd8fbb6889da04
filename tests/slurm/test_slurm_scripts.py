"""slurm/train_70b.sh and slurm/train_8b.sh under a real (private) Slurm cluster.

The jobs run the tiny config on 2 CPU ranks: GPUS_PER_NODE=2, and --gpus-per-node=0 and
--nodes on the sbatch command line lift the scripts' GPU request and node count. The
reference for preemption is an uninterrupted run of the same configuration: the per-step
losses must be the same numbers.
"""
import json
import math
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB = "tests/slurm/stub_trainer.py"
# The trainer the Slurm jobs run (the scripts' TRAIN_ENTRY); STUB to test the scripts alone.
TRAINER = "megafusion/train.py"

STEPS = 40  # long enough (~13 s of steps on this CPU) to signal the job mid-run
SIGNAL_AT_STEP = 5
JOB_TIMEOUT = 420  # seconds for one job, requeues included

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def job_env(tmp: Path, shards: str, **extra) -> dict:
    """What a user would export before sbatch: the tiny config on 2 CPU ranks."""
    env = {
        "CONFIG": "configs/tiny.yaml",
        "RUN_DIR": str(tmp / "run"),
        "GPUS_PER_NODE": "2",
        "TRAIN_ENTRY": TRAINER,
        "OVERRIDES": f"data.train={shards} data.cache_root={tmp / 'cache'} train.steps={STEPS} checkpoint.every=10",
        "STUB_STEP_SECONDS": "0.3",  # read by the stub only
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


# Inherited by the job from the test process's environment, they would mask what the
# scripts set.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "DS_ACCELERATOR", "SLURM_JOB_ID")


def submit_env(cluster, env: dict) -> dict:
    # NCCL settings too: the scripts' site defaults are under test.
    full = {k: v for k, v in cluster.env.items() if k not in _LAUNCH_VARS and "NCCL" not in k}
    full.update(env)
    return full


def sbatch_cmd(script: str, tmp: Path, name: str, *flags: str, args=()) -> list[str]:
    return ["sbatch", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0",
            f"--output={tmp}/%x-%j.out", f"--error={tmp}/%x-%j.err", *flags, str(REPO / script), *args]


def job_log(tmp: Path, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(tmp.glob(f"{name}-*.*")))


def sbatch_wait(cluster, script: str, tmp: Path, env: dict, *flags: str, args=()) -> tuple[int, str]:
    """`sbatch --wait` from the repository root, as a user runs it; (exit code, job log).
    sbatch polls with a growing interval of up to 10 s, so the other tests poll faster."""
    name = f"mf-{uuid.uuid4().hex[:8]}"
    try:
        proc = subprocess.run(sbatch_cmd(script, tmp, name, "--wait", *flags, args=args), cwd=REPO,
                              env=submit_env(cluster, env), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        cluster.run(["scancel", "--name", name], check=False)
        pytest.fail(f"job did not finish in {JOB_TIMEOUT}s:\n{job_log(tmp, name)[-4000:]}\n{cluster.logs()}")
    return proc.returncode, proc.stderr + job_log(tmp, name)


class Job:
    """A submitted job, polled every 0.2 s through scontrol."""

    FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
             "PREEMPTED"}

    def __init__(self, cluster, script: str, tmp: Path, env: dict, *flags: str, args=()):
        self.cluster, self.tmp = cluster, tmp
        self.name = f"mf-{uuid.uuid4().hex[:8]}"
        out = subprocess.run(sbatch_cmd(script, tmp, self.name, "--parsable", *flags, args=args), cwd=REPO,
                             env=submit_env(cluster, env), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]

    def log(self) -> str:
        return job_log(self.tmp, self.name)

    def wait(self, until=None) -> int | None:
        """Exit code once the job is over (a requeued job is not), or None as soon as
        `until()` is true."""
        deadline = time.time() + JOB_TIMEOUT
        while time.time() < deadline:
            if until is not None and until():
                return None
            info = self.cluster.run(["scontrol", "show", "job", "-o", self.id]).stdout
            fields = dict(tok.split("=", 1) for tok in info.split() if "=" in tok)
            if fields.get("JobState") in self.FINAL:
                return int(fields["ExitCode"].split(":")[0])
            time.sleep(0.2)
        self.cluster.run(["scancel", self.id], check=False)
        pytest.fail(f"job {self.id} not done in {JOB_TIMEOUT}s:\n{self.log()[-4000:]}\n{self.cluster.logs()}")


def submit(cluster, script: str, tmp: Path, env: dict, *flags: str, args=()) -> tuple[int, str]:
    """Submit, wait for the end; (exit code, job log)."""
    job = Job(cluster, script, tmp, env, *flags, args=args)
    return job.wait(), job.log()


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records of <run.dir>/metrics.jsonl, the last one of each step."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r for r in rows}


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(step, row["loss"]) for step, row in sorted(metrics(run_dir).items())]


def latest(run_dir: Path) -> str:
    path = run_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else ""


def assert_finished(rc: int, log: str, run_dir: Path) -> None:
    assert rc == 0, f"job exited {rc}:\n{log[-4000:]}"
    assert latest(run_dir) == f"global_step{STEPS}", log[-4000:]
    assert (run_dir / "checkpoints" / f"global_step{STEPS}").is_dir()
    assert sorted(metrics(run_dir)) == list(range(1, STEPS + 1))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(synthetic_shards, tiny_llama):
    return synthetic_shards  # tiny_llama: the base model configs/tiny.yaml names


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, shards, tmp_path_factory):
    """sbatch --wait slurm/train_70b.sh, uninterrupted, one node, two ranks."""
    tmp = tmp_path_factory.mktemp("slurm-reference")
    rc, log = sbatch_wait(slurm_cluster, "slurm/train_70b.sh", tmp, job_env(tmp, shards))
    return rc, log, tmp / "run"


# --------------------------------------------------------------------------- tests


def test_train_70b_runs_two_ranks_and_checkpoints(reference_run):
    rc, log, run_dir = reference_run
    assert_finished(rc, log, run_dir)
    assert "1 node(s) x 2 rank(s), world size 2" in log
    for rank in (0, 1):  # srun --label prefixes each rank's lines with "<rank>: "
        assert f"{rank}: [megafusion-slurm] rank {rank} of 2 (local {rank})" in log, log[-3000:]
    assert "DS_ACCELERATOR=cpu" in log


def signal_mid_run(cluster, script: str, tmp: Path, env: dict, signal: str, at_step: int) -> tuple[int, str, str]:
    """Submit the script; once metrics.jsonl reaches `at_step`, send `signal` to the
    batch shell only, as `#SBATCH --signal=B:USR1@600` does before the time limit.
    Returns (exit code, job log, job id)."""
    job = Job(cluster, script, tmp, env)
    run_dir = Path(env["RUN_DIR"])
    rc = job.wait(until=lambda: max(metrics(run_dir), default=0) >= at_step)
    assert rc is None, f"job ended ({rc}) before step {at_step}:\n{job.log()[-4000:]}"
    cluster.run(["scancel", f"--signal={signal}", "--batch", job.id])
    return job.wait(), job.log(), job.id


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm_cluster, shards, reference_run, tmp_path):
    _, ref_log, ref_dir = reference_run
    assert latest(ref_dir) == f"global_step{STEPS}", ref_log[-3000:]
    rc, log, job_id = signal_mid_run(slurm_cluster, "slurm/train_70b.sh", tmp_path, job_env(tmp_path, shards),
                                     "USR1", SIGNAL_AT_STEP)
    assert "got SIGUSR1" in log and f"requeueing job {job_id}" in log, log[-4000:]
    assert f"job {job_id} (restart 1)" in log, log[-4000:]  # the rerun: same job, SLURM_RESTART_COUNT=1
    run_dir = tmp_path / "run"
    assert_finished(rc, log, run_dir)
    assert losses(run_dir) == losses(ref_dir)


def test_preemption_during_setup_exits_zero_and_requeues(slurm_cluster, shards, tmp_path):
    """USR1 to the batch shell while every rank is still setting up (held in the model
    build by a test hook): the ranks exit 0 before their first step, with nothing to
    save, which common.sh requeues (`if (( rc == 0 )); then mf_requeue`); the rerun
    trains the whole run. Before, the trainer's handler was installed after setup: the
    signal's default action killed the ranks and the job failed without a requeue."""
    steps, hold = 4, tmp_path / "hold"
    hold.mkdir()
    env = job_env(tmp_path, shards, TRAIN_ENTRY="tests/train/instrumented_train.py",
                  MEGAFUSION_TEST_HOLD_SETUP=str(hold),
                  OVERRIDES=f"data.train={shards} data.cache_root={tmp_path / 'cache'} train.steps={steps} "
                            "checkpoint.every=2")
    job = Job(slurm_cluster, "slurm/train_8b.sh", tmp_path, env)
    rc = job.wait(until=lambda: all((hold / f"held.rank{r}").exists() for r in (0, 1)))
    assert rc is None, f"job ended ({rc}) before its ranks were set up:\n{job.log()[-4000:]}"
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job.id])
    deadline = time.time() + 120
    while not all(f"[rank {r}] received SIGUSR1" in job.log() for r in (0, 1)):
        assert time.time() < deadline, job.log()[-4000:]
        time.sleep(0.2)
    (hold / "release").touch()
    rc, log = job.wait(), job.log()
    assert "stopped by signal before the first step" in log, log[-4000:]
    assert f"requeueing job {job.id}" in log and f"job {job.id} (restart 1)" in log, log[-4000:]
    run_dir = tmp_path / "run"
    assert rc == 0, log[-4000:]
    assert latest(run_dir) == f"global_step{steps}" and sorted(metrics(run_dir)) == list(range(1, steps + 1))


def test_two_nodes_one_rank_each(two_node_cluster, shards, tmp_path):
    env = job_env(tmp_path, shards, GPUS_PER_NODE="1", CPUS_PER_RANK="1")
    rc, log = submit(two_node_cluster, "slurm/train_70b.sh", tmp_path, env, "--nodes=2")
    run_dir = tmp_path / "run"
    assert rc == 0, f"job exited {rc}:\n{log[-4000:]}\n{two_node_cluster.logs()}"
    assert_finished(rc, log, run_dir)
    assert "on node[1-2]: 2 node(s) x 1 rank(s), world size 2" in log, log[-3000:]
    node1_addr = two_node_cluster.nodes[0].addr
    assert f"rendezvous {node1_addr}:" in log  # MASTER_ADDR: the first node's NodeAddr
    assert "0: [megafusion-slurm] rank 0 of 2 (local 0) on node1" in log
    assert "1: [megafusion-slurm] rank 1 of 2 (local 0) on node2" in log
    # Not the reference's numbers: streaming assigns samples to ranks by node layout
    # (2 nodes x 1 rank draws other samples per rank than 1 node x 2 ranks).
    assert all(math.isfinite(loss) for _, loss in losses(run_dir))


def test_launch_contract_with_stub_trainer(slurm_cluster, tmp_path):
    """train_8b.sh exports what DeepSpeed and streaming read (the stub refuses to start
    without RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    and passes run.dir, parallel.ds_config, OVERRIDES and the script's arguments in
    that order."""
    env = job_env(tmp_path, "unused", TRAIN_ENTRY=STUB, OVERRIDES="train.steps=3 train.betas=[0.9,0.99]",
                  STUB_STEP_SECONDS="0", DS_CONFIG="ds_configs/zero3.json")
    rc, log = submit(slurm_cluster, "slurm/train_8b.sh", tmp_path, env, args=["checkpoint.every=2"])
    assert rc == 0, log[-4000:]
    run_dir = tmp_path / "run"
    expected_args = (f"run.dir={run_dir} parallel.ds_config={REPO / 'ds_configs' / 'zero3.json'} "
                     "train.steps=3 train.betas=[0.9,0.99] checkpoint.every=2")
    for rank in (0, 1):
        line = next((l for l in log.splitlines() if l.startswith(f"{rank}: stub_trainer: rank {rank}/2 local {rank}/2")), None)
        assert line is not None, log[-3000:]
        assert "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1" in line
        assert f"config={REPO / 'configs' / 'tiny.yaml'} overrides={expected_args}" in line, line
    assert latest(run_dir) == "global_step3"
    assert sorted(metrics(run_dir)) == [1, 2, 3]


def test_bad_config_fails_in_one_line_without_requeue(slurm_cluster, tmp_path):
    env = job_env(tmp_path, "unused", CONFIG="configs/no_such.yaml")
    rc, log = submit(slurm_cluster, "slurm/train_70b.sh", tmp_path, env)
    assert rc == 1
    assert "megafusion-slurm: error: CONFIG=configs/no_such.yaml: no such file" in log
    assert "requeue" not in log


def test_sigterm_to_batch_shell_checkpoints_and_requeues_too(slurm_cluster, tmp_path):
    """SIGTERM to the batch shell takes the USR1 path (the ranks get USR1 through srun,
    which would SIGKILL them on a SIGTERM of its own). Stub trainer: a fast start."""
    steps = 30
    env = job_env(tmp_path, "unused", TRAIN_ENTRY=STUB, OVERRIDES=f"train.steps={steps}", STUB_STEP_SECONDS="0.2")
    rc, log, job_id = signal_mid_run(slurm_cluster, "slurm/train_8b.sh", tmp_path, env, "TERM", 3)
    assert rc == 0, log[-4000:]
    assert "got SIGTERM" in log and f"job {job_id} (restart 1)" in log, log[-4000:]
    assert "stub_trainer: rank 0 got SIGUSR1" in log  # what srun passed on
    run_dir = tmp_path / "run"
    assert latest(run_dir) == f"global_step{steps}"
    assert sorted(metrics(run_dir)) == list(range(1, steps + 1))
