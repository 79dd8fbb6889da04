"""slurm/common.sh when the ranks fail on their own (a GPU fault, an NCCL timeout: a
non-zero exit without a stop signal), with the stub trainer crashing on demand
(STUB_CRASH_AFTER_STEPS), and the launch settings a site can override. The reference for
a requeued run is an uninterrupted run of the same job."""
import os
import subprocess
from pathlib import Path

import pytest

from test_slurm_scripts import REPO, STUB, job_env, latest, losses, metrics, submit


def stub_env(tmp: Path, steps: int, **extra) -> dict:
    """The stub trainer on 2 ranks, checkpointing every 2 steps, no sleeping."""
    return job_env(tmp, "unused", TRAIN_ENTRY=STUB, OVERRIDES=f"train.steps={steps} checkpoint.every=2",
                   STUB_STEP_SECONDS="0", RUN_DIR=str(tmp / "run"), **extra)


@pytest.mark.slow
def test_crash_after_progress_is_requeued_and_finishes(slurm_cluster, tmp_path):
    steps = 8
    (tmp_path / "ref").mkdir()
    rc, ref_log = submit(slurm_cluster, "slurm/train_8b.sh", tmp_path / "ref", stub_env(tmp_path / "ref", steps))
    assert rc == 0, ref_log[-3000:]
    # Rank 1 exits 3 after step 3 of the first attempt; the checkpoint of step 2 is new.
    env = stub_env(tmp_path, steps, STUB_CRASH_AFTER_STEPS="3", STUB_CRASH_ATTEMPTS="1")
    rc, log = submit(slurm_cluster, "slurm/train_8b.sh", tmp_path, env)
    assert rc == 0, log[-4000:]
    assert "stub_trainer: rank 1 crashing at step 3 (attempt 0)" in log, log[-4000:]
    assert "after progress (checkpoint step -1 -> 2): crash requeue 1 of 3" in log, log[-4000:]
    assert "(restart 1)" in log and "(restart 2)" not in log
    run_dir = tmp_path / "run"
    assert latest(run_dir) == f"global_step{steps}"
    assert losses(run_dir) == losses(tmp_path / "ref" / "run")


@pytest.mark.slow
def test_crash_without_progress_is_not_requeued(slurm_cluster, tmp_path):
    """A crash before the attempt's first checkpoint (a bad node, a deterministic bug)
    would crash again: the job fails."""
    env = stub_env(tmp_path, 8, STUB_CRASH_AFTER_STEPS="1")
    rc, log = submit(slurm_cluster, "slurm/train_8b.sh", tmp_path, env)
    assert rc != 0, log[-4000:]
    assert "wrote no new checkpoint (latest step -1 before and after); not requeueing" in log, log[-4000:]
    assert "(restart 1)" not in log and "requeueing job" not in log
    assert latest(tmp_path / "run") == ""


@pytest.mark.slow
def test_crash_requeues_are_bounded(slurm_cluster, tmp_path):
    """Every attempt crashes after progress: MAX_CRASH_REQUEUES=2 requeues, then the job
    fails. Attempts resume at 0, 2, 4 and crash 3 steps later, after checkpointing 2, 4, 6."""
    env = stub_env(tmp_path, 30, STUB_CRASH_AFTER_STEPS="3", MAX_CRASH_REQUEUES="2")
    rc, log = submit(slurm_cluster, "slurm/train_8b.sh", tmp_path, env)
    assert rc != 0, log[-4000:]
    assert "crash requeue 1 of 2" in log and "crash requeue 2 of 2" in log, log[-4000:]
    assert "(restart 2)" in log and "(restart 3)" not in log, log[-4000:]
    assert ("after progress (checkpoint step 4 -> 6), but the job has had 2 crash requeue(s), "
            "MAX_CRASH_REQUEUES=2; not requeueing") in log, log[-4000:]
    assert latest(tmp_path / "run") == "global_step6"
    assert sorted(metrics(tmp_path / "run")) == list(range(1, 8))


@pytest.mark.slow
def test_nccl_site_defaults_reach_the_ranks_and_the_environment_wins(slurm_cluster, tmp_path):
    env = stub_env(tmp_path, 1, NCCL_IB_TIMEOUT="19", NCCL_DEBUG="INFO")
    rc, log = submit(slurm_cluster, "slurm/train_70b.sh", tmp_path, env)
    assert rc == 0, log[-4000:]
    for rank in (0, 1):
        line = next(l for l in log.splitlines() if l.startswith(f"{rank}: stub_trainer: rank {rank}/2"))
        nccl = dict(kv.split("=", 1) for kv in line.split(" nccl=", 1)[1].split(" ", 1)[0].split(","))
        assert nccl == {"NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "INFO", "NCCL_IB_RETRY_CNT": "7",
                        "NCCL_IB_TIMEOUT": "19", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, line


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def test_master_port_is_outside_the_ephemeral_range():
    """MASTER_PORT for job ids from 1 to 10 million: in 20000-29999, below the kernel's
    ephemeral range (Linux's default, and this machine's), and spread over that range
    (consecutive jobs on a shared node get different ports)."""
    ids = list(range(1, 30001)) + list(range(9_990_000, 10_000_001, 7))
    script = f'source {REPO / "slurm/common.sh"}; while read -r id; do mf_master_port "$id"; done'
    out = subprocess.run(["bash", "-c", script], input="\n".join(map(str, ids)) + "\n", capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    ports = [int(p) for p in out.stdout.split()]
    assert len(ports) == len(ids)
    lo, hi = ephemeral_range()
    for eph_lo, eph_hi in ((lo, hi), (32768, 60999)):
        assert not [p for p in ports if eph_lo <= p <= eph_hi]
    assert all(20000 <= p <= 29999 for p in ports)
    assert len(set(ports[:10000])) == 10000
