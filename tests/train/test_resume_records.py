"""What a resume carries over besides the weights: each optimizer parameter group's own
settings through an elastic resume (megafusion/parallel/elastic.py), and a run's records
(megafusion/parallel/step_log.py: metrics.jsonl and tensorboard) through a crash resume.

References: the parameter groups the uninterrupted engine saved in its checkpoint and
the config's values; for the records, which attempt wrote a step's line (the first
attempt's step was skipped as NaN, the second's was not)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import INSTRUMENTED, REPO, metrics, run

from megafusion.config import load_config, lr_multiplier

pytestmark = pytest.mark.slow

# instrumented_train.py, plus: right after the checkpoint is restored, rank 0 saves the
# optimizer's parameter groups (all keys but 'params') to $MEGAFUSION_TEST_DUMP_GROUPS.
GROUPS_DUMPER = f"""
import os, runpy, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import megafusion.parallel.checkpoint as checkpoint

real_load_latest = checkpoint.load_latest

def dumping_load_latest(engine, *args, **kwargs):
    client = real_load_latest(engine, *args, **kwargs)
    if client is not None and int(os.environ.get("RANK", "0")) == 0:
        groups = [{{k: v for k, v in g.items() if k != "params"}} for g in engine.optimizer.param_groups]
        torch.save(groups, os.environ["MEGAFUSION_TEST_DUMP_GROUPS"])
    return client

checkpoint.load_latest = dumping_load_latest
runpy.run_path({INSTRUMENTED!r}, run_name="__main__")
"""

SETTINGS = ("lr", "initial_lr", "weight_decay", "betas", "eps")


def saved_groups(tag_dir: Path) -> list[dict]:
    """The parameter groups (all keys but 'params') rank 0 saved in a ZeRO-3 checkpoint."""
    sd = torch.load(next(tag_dir.glob("*zero_pp_rank_0_*optim_states.pt")), weights_only=False)
    return [{k: v for k, v in g.items() if k != "params"}
            for g in sd["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]]


def test_elastic_resume_keeps_each_parameter_groups_settings(tmp_path, tiny_llama, synthetic_shards):
    """Weight decay 0.1 and image-only blocks at their own lr: groups image,
    image_no_decay (weight decay 0), image_blocks and image_blocks_no_decay (lr 1e-3, not
    the image tower's 5e-3). Stopped by a signal after step 3 on 2 ranks, resumed on 1
    under ZeRO-3: right after the load every group has the settings the uninterrupted
    engine saved at step 3 and the config gives; so does the final checkpoint. DeepSpeed's
    ZeRO-3 universal load alone gave every group group 0's (decaying the norms and biases
    for the rest of the run)."""
    steps, stop = 6, 3
    script = tmp_path / "dump_groups_train.py"
    script.write_text(GROUPS_DUMPER)
    dump = tmp_path / "groups.pt"
    run_dir = tmp_path / "run"
    extra = ("checkpoint.every=0", "train.weight_decay=0.1", "model.patcher_layers=1", "train.patcher_layers_lr=1e-3")
    code, out = run(run_dir, synthetic_shards, steps, *extra, "train.gradient_accumulation=1", ranks=2,
                    script=INSTRUMENTED, env={"MEGAFUSION_TEST_SIGUSR1_AT_STEP": str(stop)})
    assert code == 0 and f"stopped by signal after step {stop}" in out, out[-4000:]
    held = saved_groups(run_dir / "checkpoints" / f"global_step{stop}")
    code, out = run(run_dir, synthetic_shards, steps, *extra, "train.gradient_accumulation=2", ranks=1,
                    script=str(script), env={"MEGAFUSION_TEST_DUMP_GROUPS": str(dump)})
    assert code == 0, out[-4000:]
    assert "written by 2 ranks and loaded on 1" in out, out[-4000:]

    cfg = load_config(run_dir / "config.yaml")
    t = cfg.train
    peak = {"image": t.lr, "image_blocks": t.patcher_layers_lr}
    expected = []
    for name in ("image", "image_no_decay", "image_blocks", "image_blocks_no_decay"):
        tower = name.removesuffix("_no_decay")
        expected.append({"name": name, "weight_decay": 0.0 if name.endswith("_no_decay") else 0.1,
                         "initial_lr": peak[tower], "lr": peak[tower] * lr_multiplier(stop, t),
                         "betas": tuple(t.betas), "eps": t.eps})
    loaded = torch.load(dump, weights_only=False)
    for got in (held, loaded):  # the uninterrupted engine's, and the resumed one's
        assert len(got) == len(expected)
        for g, want in zip(got, expected):
            assert g["name"] == want["name"], ([x["name"] for x in got], want["name"])
            for key in SETTINGS:
                value = tuple(g[key]) if key == "betas" else g[key]
                assert value == pytest.approx(want[key], rel=1e-12), (g["name"], key, g[key], want[key])
    for g, h in zip(loaded, held):
        assert {k: g[k] for k in ("name", *SETTINGS)} == {k: h[k] for k in ("name", *SETTINGS)}
    final = saved_groups(run_dir / "checkpoints" / f"global_step{steps}")
    assert [(g["name"], g["weight_decay"], g["initial_lr"]) for g in final] == \
        [(w["name"], w["weight_decay"], w["initial_lr"]) for w in expected]


def test_crash_resume_records_each_step_once(tmp_path, tiny_llama, synthetic_shards):
    """One rank, checkpoints every 2 steps, steps 3 and 4 NaN with train.max_bad_steps=2:
    the run logs steps 1-3 and exits with an error after step 4, its newest checkpoint
    at step 2. Resumed without the NaNs, it redoes steps 3 and 4. metrics.jsonl holds
    steps 1-4 once each, step 3's line from the second attempt (not skipped, train_s
    counted from that attempt's start), and so does tensorboard (purge_step). Before,
    the first attempt's step 3 stayed in both beside the second's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    extra = ("checkpoint.every=2", "train.max_bad_steps=2", "log.tensorboard=true", "log.every=1")
    code, out = run(run_dir, synthetic_shards, 4, *extra, ranks=1, env={"MEGAFUSION_INJECT_NAN_STEPS": "3,4"})
    assert code != 0 and "the last at step 4" in out, out[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step2"
    first = metrics(run_dir)
    assert [r["step"] for r in first] == [1, 2, 3] and first[2]["skipped"]

    def tensorboard_steps():
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("loss/total")]

    assert [s for s, _ in tensorboard_steps()] == [1, 2, 3]  # the first attempt's step 3 is on disk

    code, out = run(run_dir, synthetic_shards, 4, *extra, ranks=1)
    assert code == 0 and "at step 2" in out, out[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == first[:2]
    assert not rows[2]["skipped"] and not rows[3]["skipped"]
    assert rows[2]["train_s"] == pytest.approx(rows[2]["step_s"], abs=2e-3)  # the second attempt's first step
    board = tensorboard_steps()
    assert [s for s, _ in board] == [1, 2, 3, 4]
    assert board[2][1] == pytest.approx(rows[2]["loss"])  # finite: the second attempt's


def test_resume_drops_later_and_torn_lines(tmp_path):
    """The rewrite itself: a killed writer's last line may be cut off mid-record."""
    from megafusion.parallel.step_log import drop_steps_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "lo')
    drop_steps_after(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob("*.tmp"))
    drop_steps_after(tmp_path / "absent.jsonl", 3)  # a resume into a run dir without records
    assert not (tmp_path / "absent.jsonl").exists()
