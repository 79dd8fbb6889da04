"""tools/demo.py's command line before anything runs: --help and a mistyped option used
to reach the trainer as overrides, after the previous demo run had been deleted (and
--help ended in a traceback once the trainer printed its own usage)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arg,code,stream,text", [
    ("--help", 0, "stdout", "usage: python tools/demo.py [--long]"),
    ("--steps=5", 2, "stderr", "error: unknown option --steps=5"),
])
def test_demo_options_are_answered_before_anything_is_removed(tmp_path, arg, code, stream, text):
    # MEGAFUSION_DATA points the demo's shards here: the first thing the demo writes
    # (before it removes the previous run and launches), so nothing must appear.
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), arg], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "MEGAFUSION_DATA": str(tmp_path / "data")})
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert text in getattr(done, stream)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()
