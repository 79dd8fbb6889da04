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


def test_settings_difference_names_what_changed(tmp_path):
    from megafusion.eval.ablate import run_settings, settings_difference

    config = tmp_path / "c.yaml"
    config.write_text("train: {steps: 3}\n")
    base = dict(config=config, train_args=["run.dir=/r", "model.tower_mode=xfuse"], steps=3, minutes=None, n=4, ranks=1)
    now = run_settings(**base)
    assert now["config"] == str(config.resolve()) and now["train_args"] == ["run.dir=/r", "model.tower_mode=xfuse"]
    assert settings_difference(json.loads(json.dumps(now)), now) is None  # as stored in result.json
    assert settings_difference(now, run_settings(**{**base, "steps": 5})) == "steps 3 -> 5"
    assert settings_difference(now, run_settings(**{**base, "n": 8})) == "n 4 -> 8"
    assert settings_difference(now, run_settings(**{**base, "steps": None, "minutes": 2.0})) == \
        "steps 3 -> None; minutes None -> 2.0"
    changed = run_settings(**{**base, "train_args": [*base["train_args"], "train.lr=0.1"]})
    assert settings_difference(now, changed) == "trainer arguments train.lr=0.1"
    assert settings_difference(None, now) == "its settings were not recorded"
    assert settings_difference({k: v for k, v in now.items() if k != "ranks"}, now) == "ranks None -> 1"
    config.write_text("train: {steps: 4}\n")
    assert settings_difference(now, run_settings(**base)) == "the config file's content"


def _stored_result(run_dir: Path, settings) -> None:
    run_dir.mkdir(parents=True)
    row = design_row({"generation": {"colour": {"accuracy": 0.5}}, "captioning": {"colour": {"accuracy": 1.0}}},
                     {"max_abs_logit_diff": 0.0, "perplexity_ratio": 1.0}, dict(steps=3, step_s=1.0))
    result = dict(mode=run_dir.name, row=row, shapes={}, text={}, run_dir=str(run_dir))
    if settings is not None:
        result["settings"] = settings
    (run_dir / "result.json").write_text(json.dumps(result))


SAME = ["--steps", "3", "--n", "4"]


@pytest.mark.parametrize("change, message", [
    (["--steps", "5", "--n", "4"], "steps 3 -> 5"),
    (["--steps", "3", "--n", "8"], "n 4 -> 8"),
    (["--minutes", "1", "--n", "4"], "steps 3 -> None; minutes None -> 1.0"),
    ([*SAME, "train.lr=0.001"], "trainer arguments train.lr=0.001"),
    (None, "its settings were not recorded"),  # a result from before settings were stored
])
def test_a_result_is_reused_only_under_the_same_settings(tmp_path, monkeypatch, capsys, change, message):
    """An earlier design's result.json used to be reused whatever --steps, --n or the
    overrides were now, so the table mixed designs trained under different settings."""
    sys.path.insert(0, str(REPO))
    import tools.ablate as A
    from megafusion.config import load_config

    def no_training(*a, **k):
        raise AssertionError("a design was trained")

    monkeypatch.setattr(A, "train", no_training)
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "val").mkdir(parents=True)
    common = ["--tower-modes", "lmfusion,xfuse", "--data", str(data), "--out", str(out), "--ranks", "1"]
    # The settings the first ablation (steps 3, n 4, no overrides) stored with each result,
    # built as main builds them.
    args, overrides = A.parse([*common, *SAME])
    cfg = load_config(args.config, overrides)
    overrides = [*A.pinned_recipe(cfg, overrides), *overrides]
    for mode in ("lmfusion", "xfuse"):
        settings = None
        if change is not None:
            settings = json.loads(json.dumps(A.design_plan(mode, args, overrides, cfg, data.resolve())[2]))
            assert (settings["steps"], settings["n"], settings["ranks"], settings["minutes"]) == (3, 4, 1, None)
            assert f"run.dir={out.resolve() / mode}" in settings["train_args"] and "train.steps=3" in settings["train_args"]
        _stored_result(out / mode, settings)
    if change is not None:
        # The same settings: both results reused, nothing trained.
        assert A.main([*common, *SAME]) == 0
        assert "scored already under the same settings" in capsys.readouterr().out
        assert json.loads((out / "ablation.json").read_text())["designs"]["xfuse"]["row"]["generation/colour"] == 0.5
    # Other settings: refused in one line before anything trains (no_training would raise).
    assert A.main([*common, *(change or SAME)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: lmfusion: the result in") and message in err[0], err
    assert "--fresh" in err[0]


def test_an_interrupted_run_resumes_only_under_the_same_settings(tmp_path):
    sys.path.insert(0, str(REPO))
    import tools.ablate as A
    from megafusion.eval.ablate import run_settings

    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    run_dir = tmp_path / "xfuse"
    run_dir.mkdir()
    settings = run_settings(config=config, train_args=["train.steps=3"], steps=3, minutes=None, n=4, ranks=1)
    assert A.reuse_problem("xfuse", run_dir, settings) is None  # nothing there yet
    (run_dir / A.SETTINGS_FILE).write_text(json.dumps(settings))
    assert A.reuse_problem("xfuse", run_dir, settings) is None
    other = run_settings(config=config, train_args=["train.steps=9"], steps=9, minutes=None, n=4, ranks=1)
    problem = A.reuse_problem("xfuse", run_dir, other)
    assert problem.startswith("xfuse: the interrupted run in") and "steps 3 -> 9" in problem and "--fresh" in problem
