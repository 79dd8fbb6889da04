import subprocess
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")  # a factory: module scope lets module fixtures use it
def run_two_ranks(tiny_llama):
    """run_two_ranks(worker) starts tests/parallel/<worker> on two CPU ranks (gloo,
    tests/launchers.py) on configs/tiny.yaml and returns its combined output; fails on
    a non-zero exit."""

    def run(worker: str, *args: str, timeout: int = 600) -> str:
        cmd = [*launcher_cmd(2), str(REPO / "tests/parallel" / worker), str(REPO / "configs/tiny.yaml"), *args]
        out = subprocess.run(cmd, cwd=REPO, env=launcher_env(2), capture_output=True, text=True, timeout=timeout)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-4000:]
        return text

    return run
