"""tools/learning_curve.py: shapes accuracy against CPU-minutes of training steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _summary(colour, shape):
    return {"colour": {"accuracy": colour, "n": 4, "chance": 1 / 6}, "shape": {"accuracy": shape, "n": 4, "chance": 1 / 3}}


@pytest.fixture
def run(tmp_path):
    # Steps 1-4 of 3 s each, then a crash after step 4: the resumed attempt redoes step 4
    # (5 s this time) and goes on with 2 s steps. Evaluations at steps 2 and 6.
    metrics = [{"step": s, "step_s": 3.0} for s in (1, 2, 3, 4)]
    metrics += [{"step": 4, "step_s": 5.0}, {"step": 5, "step_s": 2.0}, {"step": 6, "step_s": 2.0}]
    _write(tmp_path / "metrics.jsonl", metrics)
    _write(tmp_path / "shapes_eval.jsonl", [
        {"step": 2, "n": 4, "generation": _summary(0.25, 0.5), "captioning": _summary(0.0, 0.25)},
        {"step": 6, "n": 4, "generation": _summary(1.0, 0.75), "captioning": _summary(0.75, 0.5)}])
    return tmp_path


def test_points_count_each_step_once_and_scale_by_cores(run):
    from megafusion.eval.curve import load_curve

    points = load_curve(run, cores=2)
    # step 2: 3 + 3 s; step 6: 3 + 3 + 3 + 5 (the redone step 4 replaces the first) + 2 + 2 s
    assert [p["step"] for p in points] == [2, 6]
    assert points[0]["cpu_minutes"] == pytest.approx(6 * 2 / 60)
    assert points[1]["cpu_minutes"] == pytest.approx(18 * 2 / 60)
    assert points[1]["generation"] == {"colour": 1.0, "shape": 0.75}
    assert points[0]["captioning"]["shape"] == 0.25


def test_cli_draws_the_plot_and_refuses_a_run_without_evaluations(run, tmp_path):
    out = tmp_path / "curve.png"
    p = subprocess.run([sys.executable, str(REPO / "tools/learning_curve.py"), str(run), "--out", str(out), "--cores", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "0.6" in p.stdout and "plot:" in p.stdout  # step 6 at 0.6 CPU-minutes
    (run / "shapes_eval.jsonl").unlink()
    p = subprocess.run([sys.executable, str(REPO / "tools/learning_curve.py"), str(run)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "shapes_eval.jsonl" in p.stderr and len(p.stderr.strip().splitlines()) == 1
