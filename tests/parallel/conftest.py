import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_two_ranks(tiny_llama):
    """run_two_ranks(worker) starts tests/parallel/<worker> under `deepspeed --num_gpus 2`
    on configs/tiny.yaml (CPU, gloo) and returns its combined output; fails on a
    non-zero exit."""

    def run(worker: str, *args: str, timeout: int = 600) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               str(REPO / "tests/parallel" / worker), str(REPO / "configs/tiny.yaml"), *args]
        out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True,
                             text=True, timeout=timeout)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        return text

    return run
