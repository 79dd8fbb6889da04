import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_zero3_rank_without_images_matches_reference_gradients(tiny_llama):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "tests/parallel/mixed_modality_worker.py"), str(REPO / "configs/tiny.yaml")]
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True,
                         text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert text.count("MIXED_OK") == 2, text[-4000:]
