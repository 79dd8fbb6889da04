"""parallel.collective_timeout_minutes reaches the process group: with a peer that has
stalled, a collective fails after about that long instead of DeepSpeed's default of 10
minutes (two processes, gloo)."""
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import rank_env

from megafusion.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_collective_gives_up_after_configured_timeout():
    port = free_port()
    timeout_s, stall_s = 3.0, 60.0
    procs = []
    for rank in (0, 1):
        env = rank_env(rank, 2, port, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests/parallel/timeout_worker.py"), str(REPO / "configs/tiny.yaml"),
             str(stall_s), f"parallel.collective_timeout_minutes={timeout_s / 60}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    line = next((l for l in out.splitlines() if l.startswith("COLLECTIVE_")), None)
    assert line is not None, out[-3000:]
    assert line.startswith("COLLECTIVE_FAILED_AFTER"), line
    waited = float(line.split()[1])
    # The configured 3 s plus scheduling slack on a busy 2-core machine; the peer stalls
    # for 60 s, and DeepSpeed's default would wait 600 s.
    assert timeout_s * 0.8 <= waited < 30, line


def test_collective_timeout_must_be_positive():
    from megafusion.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="parallel.collective_timeout_minutes=0"):
        load_config(str(REPO / "configs/tiny.yaml"), ["parallel.collective_timeout_minutes=0"])
