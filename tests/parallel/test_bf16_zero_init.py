import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bf16_zero_init_builds_and_trains_one_rank(tiny_llama):
    """Issue 11, blocker 1: bf16 + parallel.zero_init crashed in deepspeed.initialize
    for both patchers (and the linear one with image-only blocks)."""
    out = subprocess.run([sys.executable, str(REPO / "tests/parallel/bf16_zero_init_worker.py"),
                          str(REPO / "configs/tiny.yaml")], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for variant in ("linear", "unet", "blocks"):
        assert f"BF16_ZERO_INIT_OK {variant}" in text, text[-4000:]
