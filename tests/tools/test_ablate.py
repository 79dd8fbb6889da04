"""tools/ablate.py: two designs trained (one CPU rank, the trainer run as the harness runs it),
exported and scored; the table against each run's own files (its metrics, its export's
scores recomputed by tools/evaluate.py), and its bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.eval.ablate import design_row, parse_modes, run_cost

REPO = Path(__file__).resolve().parents[2]
ABLATE = [sys.executable, str(REPO / "tools" / "ablate.py")]


def test_run_cost_is_the_median_after_warm_up(tmp_path):
    rows = [dict(step=s, step_s=t) for s, t in [(1, 9.0), (2, 5.0), (3, 4.0), (4, 2.0), (5, 3.0), (6, 1.0), (4, 2.5)]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # Steps 4 (its last record: 2.5), 5, 6 -> median 2.5; 6 steps reached.
    assert run_cost(tmp_path) == dict(steps=6, step_s=2.5)


def test_modes_are_checked():
    assert parse_modes("lmfusion, xfuse") == ["lmfusion", "xfuse"]
    for bad, msg in (("dual", "expected"), ("xfuse,xfuse", "twice"), ("", "expected")):
        with pytest.raises(ValueError, match=msg):
            parse_modes(bad)


def test_design_row_flattens_both_directions():
    shapes = {"generation": {"colour": {"accuracy": 0.5}}, "captioning": {"shape": {"accuracy": 0.25}}}
    row = design_row(shapes, {"max_abs_logit_diff": 0.0, "perplexity_ratio": 1.0}, dict(steps=3, step_s=1.5))
    assert row == {"steps": 3, "step_s": 1.5, "generation/colour": 0.5, "captioning/shape": 0.25,
                   "max_abs_logit_diff": 0.0, "perplexity_ratio": 1.0}


@pytest.mark.parametrize("args, message", [
    (["--tower-modes", "nope"], "--tower-modes nope"),
    (["--tower-modes", "lmfusion", "--steps", "0"], "--steps 0"),
    (["--tower-modes", "lmfusion", "--steps", "2", "--minutes", "1"], "not allowed with"),
    (["--tower-modes", "lmfusion", "train.nope=1"], "train.nope"),
])
def test_bad_input_is_one_line(args, message):
    p = subprocess.run([*ABLATE, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert message in p.stderr.strip().splitlines()[-1], p.stderr


@pytest.mark.slow
def test_two_designs_side_by_side(tmp_path, tiny_llama, synthetic_shards, monkeypatch, capsys):
    out = tmp_path / "ablate"
    cmd = [*ABLATE, "--config", str(REPO / "configs/tiny.yaml"), "--tower-modes", "lmfusion,dual_tower",
           "--steps", "3", "--n", "4", "--data", synthetic_shards, "--out", str(out), "--ranks", "1",
           f"model.base={tiny_llama}", "log.tensorboard=false", "log.sample_diffusion_steps=2",
           f"data.run_id=ablate-{tmp_path.name}"]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["designs"]) == ["lmfusion", "dual_tower"]
    assert (out / "ablation.png").stat().st_size > 1000
    for mode in ("lmfusion", "dual_tower"):
        r = report["designs"][mode]
        run = out / mode
        assert json.loads((run / "hf" / "config.json").read_text())["fusion"]["tower_mode"] == mode
        assert r["row"]["steps"] == 3 == max(json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines())
        # The frozen text path: the export's logits are the base's.
        assert r["row"]["max_abs_logit_diff"] <= 1e-4 and abs(r["row"]["perplexity_ratio"] - 1) < 1e-4
        # Its scores are what tools/evaluate.py shapes gives the export.
        # tools/evaluate.py's main here, not in a process of its own: this process has
        # its imports already (a process start is ~8 s); its environment change is undone.
        from megafusion.eval.cli import main as evaluate

        monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)  # main sets it; undone after the test
        assert evaluate(["shapes", "--model", str(run / "hf"), "--data", str(Path(synthetic_shards) / "val"), "--n", "4",
                         "--steps", "2", "--out", str(tmp_path / f"{mode}.json")]) == 0
        scores = json.loads((tmp_path / f"{mode}.json").read_text())
        assert r["shapes"]["generation"] == scores["generation"] and r["shapes"]["captioning"] == scores["captioning"]
    assert "dual_tower" in p.stdout and "gen shape" in p.stdout and "x)" in p.stdout
    # Run again (its main in this process): both designs are scored already, nothing is trained.
    from tools.ablate import main as ablate

    capsys.readouterr()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert ablate(cmd[2:]) == 0
    out = capsys.readouterr().out
    assert out.count("scored already") == 2, out[-2000:]
