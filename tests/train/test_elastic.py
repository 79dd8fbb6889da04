"""Elastic resume: a run stopped on 2 ranks continues on 1 (and the reverse) through
DeepSpeed's universal checkpoint (megafusion/parallel/elastic.py).

Reference: an uninterrupted 2-rank run. The resumed runs keep its global batch (1 rank
with gradient_accumulation=2 draws what 2 ranks draw in a step) and are compared with it:
- the data: the multiset of (epoch, sample) drawn over the whole run is the reference's;
- the weights: right after the resume, every trainable parameter equals, bitwise, what
  DeepSpeed's own zero_to_fp32 consolidates from the old ranks' partitions;
- the optimizer state: right after the resume, every trainable parameter's Adam moments
  and the step count equal, bitwise, what the stopped run held as it saved;
- the losses after the resume stay within 2% of the reference's (the diffusion noise is
  drawn afresh, and one rank with two micro-batches splits a step's samples differently
  from two ranks, so the updates differ a little: 0.4% at most, measured).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from test_train import INSTRUMENTED, by_step, metrics, run

pytestmark = pytest.mark.slow

STEPS, STOP = 6, 3


def drawn(samples_dir: Path) -> Counter:
    return Counter(line for f in samples_dir.glob("samples-*.txt") for line in f.read_text().splitlines())


def launch_run(run_dir, shards, ranks, tmp_path, name, env=None, *extra):
    samples = tmp_path / f"samples-{name}"
    samples.mkdir(exist_ok=True)
    ga = 2 // ranks
    code, out = run(run_dir, shards, STEPS, "checkpoint.every=0", f"train.gradient_accumulation={ga}", *extra,
                    ranks=ranks, script=INSTRUMENTED, env={"MEGAFUSION_TEST_SAMPLES_DIR": str(samples), **(env or {})})
    assert code == 0, out[-4000:]
    return out, samples


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama, synthetic_shards):
    tmp = tmp_path_factory.mktemp("elastic-ref")
    out, samples = launch_run(tmp / "run", synthetic_shards, 2, tmp, "ref")
    return by_step(metrics(tmp / "run")), drawn(samples)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks(reference, tmp_path, synthetic_shards, before, after):
    check_resume(reference, tmp_path, synthetic_shards, before, after)


ZERO2 = ("parallel.zero_stage=2", "parallel.ds_config=ds_configs/zero2.json")


def test_zero2_resumes_on_one_rank(reference, tmp_path, synthetic_shards):
    """ZeRO-2 (the X-Fusion configs' stage, and one the planner weighs for 8B) goes
    through the same universal checkpoint: 2 ranks to step 3, then 1. The reference is
    the uninterrupted 2-rank ZeRO-3 run: the ZeRO stage changes where the optimizer state
    lives, not the arithmetic of a step, and the data drawn does not depend on it."""
    check_resume(reference, tmp_path, synthetic_shards, 2, 1, *ZERO2)


def check_resume(reference, tmp_path, synthetic_shards, before, after, *extra):
    ref, ref_drawn = reference
    run_dir = tmp_path / "run"
    at_save = tmp_path / "saved-optimizer.pt"
    out, _ = launch_run(run_dir, synthetic_shards, before, tmp_path, "first",
                        {"MEGAFUSION_TEST_SIGUSR1_AT_STEP": str(STOP), "MEGAFUSION_TEST_DUMP_SAVED": str(at_save)},
                        *extra)
    assert f"stopped by signal after step {STOP}" in out
    # The resumed part's draws go to their own folder: the first part's rank processes
    # are gone, and the two parts together must draw what the reference drew.
    dump = tmp_path / "resumed.pt"
    out, _ = launch_run(run_dir, synthetic_shards, after, tmp_path, "first", {"MEGAFUSION_TEST_DUMP_RESUMED": str(dump)},
                        *extra)
    assert f"at step {STOP}" in out and f"written by {before} ranks and loaded on {after}" in out, out[-4000:]
    assert not (run_dir / "checkpoints" / "universal").exists()  # the final save replaced it
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"

    rows = by_step(metrics(run_dir))
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert drawn(tmp_path / "samples-first") == ref_drawn
    saved = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"global_step{STOP}",
                                                     exclude_frozen_parameters=True)
    resumed = torch.load(dump)
    assert sorted(resumed) == sorted(saved) and len(saved) > 10
    for name, value in saved.items():
        assert torch.equal(resumed[name], value.float()), name
    held, loaded = torch.load(at_save), torch.load(str(dump) + ".optim")
    assert held["steps"] == loaded["steps"] == [float(STOP)], (held["steps"], loaded["steps"])
    assert sorted(loaded["moments"]) == sorted(held["moments"]) == sorted(saved)
    for name, (exp_avg, exp_avg_sq) in held["moments"].items():
        assert exp_avg.abs().sum() > 0, name  # a moment that has seen gradients
        assert torch.equal(loaded["moments"][name][0], exp_avg), name
        assert torch.equal(loaded["moments"][name][1], exp_avg_sq), name
    for s in range(STOP + 1, STEPS + 1):
        assert rows[s]["loss"] == pytest.approx(ref[s]["loss"], rel=0.02), (s, rows[s]["loss"], ref[s]["loss"])
