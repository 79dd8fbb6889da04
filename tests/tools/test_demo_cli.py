"""tools/demo.py's command line before anything runs: --help and a mistyped option used
to reach the trainer as overrides, after the previous demo run had been deleted (and
--help ended in a traceback once the trainer printed its own usage)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,code,stream,text", [
    (["--help"], 0, "stdout", "usage: python tools/demo.py [--long]"),
    (["--steps=5"], 2, "stderr", "error: unknown option --steps=5"),
    # a bare argument used to pass the option check, be dropped from the demo's config and
    # reach the trainer (refused there) after the previous run was deleted
    (["train.steps", "50"], 2, "stderr", "error: argument 'train.steps' is not an override (section.field=value)"),
    (["--long", "50"], 2, "stderr", "error: argument '50' is not an override"),
    # a misspelt or mistyped key: the config's own one-line refusal, not a traceback
    (["train.stepz=5"], 2, "stderr", "error: unknown config key train.stepz"),
    (["train.steps=abc"], 2, "stderr", "error: config key train.steps: expected int, got 'abc'"),
])
def test_demo_options_are_answered_before_anything_is_removed(tmp_path, args, code, stream, text):
    # MEGAFUSION_DATA points the demo's shards here: the first thing the demo writes
    # (before it removes the previous run and launches), so nothing must appear. run.dir
    # under tmp_path: were the argument let through, the demo would run there and leave
    # the checkout's runs/demo alone (a given run.dir is never removed).
    args = [*args, f"run.dir={tmp_path / 'run'}"]
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "MEGAFUSION_DATA": str(tmp_path / "data")})
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    assert text in getattr(done, stream)
    assert "Traceback" not in done.stderr
    if code:
        assert len(done.stderr.strip().splitlines()) <= 2 and done.stderr.startswith("error: ")
    assert not (tmp_path / "data").exists()


def test_a_bad_override_leaves_the_previous_demo_run(tmp_path, monkeypatch, capsys):
    """tools/demo.py's main in this process: a refused argument removes nothing, writes no
    shards, launches nothing (each of those would raise here)."""
    sys.path.insert(0, str(REPO))
    import tools.demo as demo

    monkeypatch.setattr(demo, "DATA", tmp_path / "data")

    def no_launch(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(demo, "ensure_shards", no_launch)
    monkeypatch.setattr(demo.subprocess, "call", no_launch)
    monkeypatch.setattr(demo.shutil, "rmtree", no_launch)
    for args in (["train.steps", "50"], ["train.stepz=5"], ["model.image_size=abc"]):
        assert demo.main(args) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "data").exists()
