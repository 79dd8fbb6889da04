"""The deepspeed launch prefix of the project's tools (make demo, tools/ablate.py,
tools/bench_demo.py): both ranks start, and the launcher prints nothing of its own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.parallel.launch import local_deepspeed_command

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.mark.slow
def test_local_launch_starts_every_rank_quietly(tmp_path):
    script = tmp_path / "rank.py"
    # One write per rank, so the two ranks' lines cannot interleave.
    script.write_text("import os\nos.write(1, f\"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}\\n\".encode())\n")
    p = subprocess.run([*local_deepspeed_command(2, DEEPSPEED), str(script)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (p.stdout + p.stderr).strip().splitlines()
    # Only what the ranks printed: no "Unable to find hostfile" or other launcher chatter.
    assert sorted(lines) == ["rank 0 of 2", "rank 1 of 2"], lines
