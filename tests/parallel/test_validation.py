"""A validation point where one rank's data.val yields no batch stops every rank at once
with the reason. Before, that rank raised alone while the others waited in ZeRO-3's
gathers for the collective timeout (30 minutes by default). The ranks are started
directly rather than under torchrun, which would stop the others itself when one fails."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launchers import rank_env

from megafusion.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_rank_without_validation_batches_stops_every_rank(tiny_llama, synthetic_shards, tmp_path):
    port = free_port()
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.train={synthetic_shards}", f"data.val={synthetic_shards}/val",
                 f"data.run_id=valempty-{tmp_path.name}", "train.steps=2", "log.val_every=1", "log.val_batches=1",
                 "log.sample_every=0", "log.tensorboard=false", "checkpoint.every=0", "parallel.zero_stage=3",
                 "parallel.collective_timeout_minutes=3"]
    procs, logs = [], [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    for rank, log in enumerate(logs):
        env = rank_env(rank, 2, port, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would block its rank
            procs.append(subprocess.Popen(
                [sys.executable, str(REPO / "tests/parallel/val_empty_worker.py"), str(REPO / "configs/tiny.yaml"),
                 *overrides], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT))
    # Start-up and one step take ~20 s here; the collective timeout is 3 minutes.
    deadline = time.time() + 120
    try:
        for rank, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} was still running 120 s after start: waiting on a peer that stopped")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        out = log.read_text()
        assert p.returncode != 0, (rank, out[-3000:])
        # Each rank names the empty rank itself: none of them died of a peer's absence.
        assert "error: data.val yields no batches on rank(s) [1] of 2" in out, (rank, out[-3000:])
