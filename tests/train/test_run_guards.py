"""What a run does at its start and with its records, through megafusion/train.py:

- run.resume=never on a directory with checkpoints, and a `latest` naming a checkpoint
  that is not there, are refused in one line; both used to start at step 0, and the
  first save (at a lower step) then pruned the run's newer checkpoints as "torn";
- a stop signal during setup ends the ranks with exit 0 (what slurm/common.sh requeues
  on), not by the signal's default action;
- bad input found only during setup (a DeepSpeed JSON, rank variables, data.val) is one
  line `error: ...`, not a traceback;
- the lr in metrics.jsonl is the one the step's update used (the schedule's closed form),
  and val_metrics.jsonl holds each step once after a crash resume.
"""
import json
import shutil
import time
from pathlib import Path

import pytest
from test_train import INSTRUMENTED, launch, metrics, run

pytestmark = pytest.mark.slow

STEPS, WARMUP, PEAK = 4, 4, 5.0e-3  # PEAK: configs/tiny.yaml's train.lr
CHECKPOINTS = ("checkpoint.every=2", "checkpoint.keep_last=0")
SCHEDULE = (f"train.warmup_steps={WARMUP}", "train.schedule=constant")


def validation(shards):
    return ("log.val_every=1", "log.val_batches=1", f"data.val={Path(shards) / 'val'}")


def val_rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "val_metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def snapshot(ckpt_dir: Path) -> dict:
    """Every file under the checkpoints directory with its bytes' size and mtime."""
    return {str(p.relative_to(ckpt_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file()}


def one_error(code: int, out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, synthetic_shards):
    """One rank, 4 steps, checkpoints at 2 and 4, validation at every step."""
    run_dir = tmp_path_factory.mktemp("guards") / "run"
    code, out = run(run_dir, synthetic_shards, STEPS, *CHECKPOINTS, *SCHEDULE, *validation(synthetic_shards), ranks=1)
    assert code == 0, out[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"
    return run_dir


def copy_run(trained, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def test_resume_never_on_a_directory_with_checkpoints_is_refused(trained, tmp_path, synthetic_shards):
    """Before: a fresh start at step 0; its save of step 2 replaced latest and removed
    global_step4 as torn."""
    run_dir = copy_run(trained, tmp_path)
    ckpt, before, rows = run_dir / "checkpoints", snapshot(run_dir / "checkpoints"), metrics(run_dir)
    code, out = run(run_dir, synthetic_shards, 2, *CHECKPOINTS, *SCHEDULE, "run.resume=never", ranks=1, timeout=300)
    error = one_error(code, out)
    assert "run.resume=never" in error and str(ckpt) in error and "global_step4" in error, error
    assert snapshot(ckpt) == before and metrics(run_dir) == rows


def test_latest_naming_a_missing_checkpoint_is_refused(trained, tmp_path, synthetic_shards):
    """`latest` names global_step6, which is gone (deleted by hand, a partial copy of the
    run directory). Before: read_latest gave None, the run started at step 0, and its
    save of step 2 moved latest there and removed global_step4 as torn."""
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    (ckpt / "latest").write_text("global_step6")
    before, rows = snapshot(ckpt), metrics(run_dir)
    code, out = run(run_dir, synthetic_shards, 2, *CHECKPOINTS, *SCHEDULE, ranks=1, timeout=300)
    error = one_error(code, out)
    assert "names global_step6" in error and "does not exist" in error and "global_step4" in error, error
    assert snapshot(ckpt) == before and metrics(run_dir) == rows


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory, synthetic_shards):
    """`trained` after a crash while step 4 was being saved, after its validation:
    `latest` names step 2; the rerun resumes there and redoes steps 3 and 4."""
    run_dir = copy_run(trained, tmp_path_factory.mktemp("resumed"))
    shutil.rmtree(run_dir / "checkpoints" / f"global_step{STEPS}")
    (run_dir / "checkpoints" / "latest").write_text("global_step2")
    code, out = run(run_dir, synthetic_shards, STEPS, *CHECKPOINTS, *SCHEDULE, *validation(synthetic_shards), ranks=1)
    assert code == 0 and "at step 2" in out, out[-4000:]
    return run_dir


def test_lr_logged_is_the_one_the_steps_update_used(trained, resumed):
    """Linear warmup over WARMUP steps from ~0: the update of (1-based) step s uses
    s / WARMUP of the peak, here the closed form. Before, the lr after the step was
    logged (the engine steps the schedule after the update): 2/4 of it at step 1."""
    expected = {s: PEAK * min(1.0, s / WARMUP) for s in range(1, STEPS + 1)}
    rows = metrics(trained)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in rows] == pytest.approx([expected[s] for s in range(1, STEPS + 1)], rel=1e-9)
    redone = [r for r in metrics(resumed) if r["step"] > 2][-2:]  # also after a resume (the restored schedule)
    assert [r["step"] for r in redone] == [3, 4]
    assert [r["lr"] for r in redone] == pytest.approx([expected[3], expected[4]], rel=1e-9)


def test_val_metrics_hold_each_step_once_after_a_crash_resume(trained, resumed):
    """Before, the resumed attempt appended steps 3 and 4 again: [1, 2, 3, 4, 3, 4]."""
    first = val_rows(trained)
    assert [r["step"] for r in first] == list(range(1, STEPS + 1))
    # Each step once; steps 3 and 4, redone from the same state, as the first time.
    assert val_rows(resumed) == first


def test_stop_signal_during_setup_exits_zero_without_a_checkpoint(tmp_path, tiny_llama, synthetic_shards):
    """Rank 0 of two gets SIGUSR1 while it builds the model. Before, the handler was
    installed after setup: the signal's default action killed the rank (status -10) and
    slurm/common.sh, which requeues a signalled job only when the ranks exit 0
    (`if (( rc == 0 )); then mf_requeue`), gave up the job. Now both ranks agree to stop
    before the first step and exit 0; nothing was trained, so nothing is saved."""
    run_dir = tmp_path / "run"
    p = launch(run_dir, synthetic_shards, STEPS, *CHECKPOINTS, script=INSTRUMENTED,
               env={"MEGAFUSION_TEST_SIGUSR1_IN_SETUP": "0"})
    out, _ = p.communicate(timeout=600)
    assert "test hook: SIGUSR1 during setup" in out, out[-4000:]
    assert p.returncode == 0, out[-4000:]
    assert "stopped by signal before the first step" in out, out[-4000:]
    assert metrics(run_dir) == [] and not (run_dir / "checkpoints" / "latest").exists()


def bad_json(tmp_path, text):
    path = tmp_path / "ds.json"
    path.write_text(text)
    return f"parallel.ds_config={path}"


@pytest.mark.parametrize("case", ["malformed_json", "owned_key", "world_vs_stages", "val_missing", "rank_env"])
def test_bad_input_found_at_start_is_one_line(tmp_path, tiny_llama, synthetic_shards, case):
    env, extra = None, []
    if case == "malformed_json":
        extra, expect = [bad_json(tmp_path, '{"zero_optimization": {"stage": 3,}}')], ["ds.json", "invalid DeepSpeed JSON"]
    elif case == "owned_key":
        extra = [bad_json(tmp_path, '{"zero_optimization": {}, "train_batch_size": 8}')]
        expect = ["ds.json", "train_batch_size is filled in from the run config"]
    elif case == "world_vs_stages":
        extra = ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json"]
        expect = ["world size 1 is not a multiple of parallel.pipeline_stages=2"]
    elif case == "val_missing":
        extra, expect = ["log.val_every=1", f"data.val={tmp_path / 'no-val'}"], [f"data.val={tmp_path / 'no-val'}"]
    else:  # found by setup_environment, inside the trainer
        env, expect = {"LOCAL_WORLD_SIZE": "two"}, ["LOCAL_WORLD_SIZE='two' is not an integer"]
    t0 = time.time()
    code, out = run(tmp_path / "run", synthetic_shards, 2, *extra, ranks=1, env=env, timeout=300)
    error = one_error(code, out)
    assert all(word in error for word in expect), error
    assert metrics(tmp_path / "run") == []
    assert time.time() - t0 < 120, "found before training, not at its first validation"
