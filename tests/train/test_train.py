"""The trainer through its real entry points: `deepspeed --num_gpus 2 megafusion/train.py`
and `torchrun --nproc_per_node 2 megafusion/train.py` (two CPU ranks, gloo; tests/launchers.py
says which test uses which) and `python megafusion/train.py` (one rank). References are other
runs: an uninterrupted run for resume, a single-process run for the pipeline, the base
model on disk for frozen weights."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from launchers import kill_job, launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "megafusion" / "train.py")
# train.py with load_base_model counted and a self-sent SIGUSR1 at a chosen step.
INSTRUMENTED = str(REPO / "tests" / "train" / "instrumented_train.py")

pytestmark = pytest.mark.slow


def overrides(run_dir, shards, steps, *extra):
    return [f"run.dir={run_dir}", f"data.train={shards}", f"data.run_id={Path(run_dir).name}-{os.getpid()}",
            f"train.steps={steps}", "log.tensorboard=false", *extra]


def launch(run_dir, shards, steps, *extra, ranks=2, env=None, script=TRAIN, launcher="torchrun"):
    """train.py (or `script`) on `ranks` CPU ranks; tests/launchers.py says why most
    tests use torchrun and which use the deepspeed launcher."""
    cmd = [*launcher_cmd(ranks, launcher), script] if ranks > 1 else [sys.executable, script]
    cmd += ["--config", str(REPO / "configs" / "tiny.yaml"), *overrides(run_dir, shards, steps, *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=launcher_env(ranks, launcher, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run(*args, timeout=600, **kw):
    p = launch(*args, **kw)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def by_step(rows):
    """Records by step (one each: a resume drops the lines of the steps it redoes first)."""
    return {r["step"]: r for r in rows}


def wait_for_step(run_dir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(r["step"] >= step for r in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def rank_processes(launcher: subprocess.Popen):
    """The rank processes (not the launcher's own processes, whose command lines also
    name train.py): what a scheduler signals."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if any(part.endswith("train.py") for part in p.cmdline())
            and not any("deepspeed.launcher" in part or "torch.distributed.run" in part for part in p.cmdline())]


REF_STEPS = 40


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama, synthetic_shards):
    """An uninterrupted two-rank ZeRO-3 run, checkpointing every 5 steps."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    code, out = run(run_dir, synthetic_shards, REF_STEPS, "checkpoint.every=5", "checkpoint.keep_last=0")
    assert code == 0, out[-4000:]
    return run_dir, out


def test_zero3_two_ranks_losses_fall(reference_run):
    run_dir, out = reference_run
    rows = by_step(metrics(run_dir))
    assert sorted(rows) == list(range(1, REF_STEPS + 1))
    first = [rows[s] for s in range(1, 6)]
    last = [rows[s] for s in range(REF_STEPS - 9, REF_STEPS + 1)]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(last, "diffusion_loss") < 0.7 * mean(first, "diffusion_loss")
    # The caption loss moves less: the random text tower is frozen, only what the image
    # tower feeds the captions through attention can lower it.
    assert mean(last, "lm_loss") < mean(first, "lm_loss") - 0.05
    assert (Path(run_dir) / "checkpoints" / "latest").read_text() == f"global_step{REF_STEPS}"
    # Rank 0's start-up report and both ranks present.
    assert "frozen" in out and "trainable" in out and "ZeRO-3 theory" in out


def test_frozen_check_runs_at_the_end(reference_run):
    """The digest check (megafusion/parallel/frozen.py, tested on its own in
    tests/parallel/test_frozen.py) ran and found the frozen shares unchanged."""
    _, out = reference_run
    assert "frozen check:" in out and "bitwise unchanged since start-up" in out


def test_checkpoints_leave_out_the_frozen_tower(reference_run):
    """A checkpoint stores the trainable image tower only (plus optimiser state)."""
    import torch

    run_dir, _ = reference_run
    tag_dir = Path(run_dir) / "checkpoints" / f"global_step{REF_STEPS}"
    states = torch.load(next(tag_dir.glob("*model_states.pt")), weights_only=False)
    keys = set(states["module"]) if states.get("module") else set()
    assert any(".image." in k for k in keys), "the trainable image tower must be in the checkpoint"
    assert not any(".text." in k or k.startswith("embed_tokens") for k in keys)
    assert not states.get("frozen_param_fragments"), "ZeRO's frozen-parameter fragments must not be stored"


def test_resume_after_sigkill_is_bitwise_exact(reference_run, tmp_path, synthetic_shards):
    """Also with samples and validation every few steps in the interrupted run only:
    neither may change the training (the reference has neither)."""
    ref_dir, _ = reference_run
    ref = by_step(metrics(ref_dir))
    run_dir = tmp_path / "run"
    extra = ("checkpoint.every=5", "checkpoint.keep_last=0", "log.sample_every=3", "log.sample_diffusion_steps=2",
             "log.sample_per_prompt=1", "log.sample_captions=1", "log.sample_caption_tokens=3", "log.val_every=4",
             "log.val_batches=1", f"data.val={Path(synthetic_shards) / 'val'}")
    p = launch(run_dir, synthetic_shards, REF_STEPS, *extra)
    wait_for_step(run_dir, 13, p)
    kill_job(p)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    resumed_from = int(latest.removeprefix("global_step"))
    assert 10 <= resumed_from <= 15
    code, out = run(run_dir, synthetic_shards, REF_STEPS, *extra)
    assert code == 0, out[-4000:]
    assert (run_dir / "samples" / "step_0000039.png").is_file() and "validation lm" in out
    assert "resumed from" in out and f"at step {resumed_from}" in out
    rows = metrics(run_dir)
    redone = [r for r in rows if r["step"] > resumed_from][-(REF_STEPS - resumed_from):]
    assert [r["step"] for r in redone] == list(range(resumed_from + 1, REF_STEPS + 1))
    for r in redone:
        for k in ("loss", "lm_loss", "diffusion_loss"):
            assert r[k] == ref[r["step"]][k], (r["step"], k, r[k], ref[r["step"]][k])


def test_sigterm_checkpoints_at_step_boundary_and_exits_zero(tmp_path, tiny_llama, synthetic_shards):
    run_dir = tmp_path / "run"
    p = launch(run_dir, synthetic_shards, 500, "checkpoint.every=0", launcher="deepspeed")
    wait_for_step(run_dir, 3, p)
    for rank in rank_processes(p):
        rank.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    assert "stopped by signal" in out
    stopped_at = max(r["step"] for r in metrics(run_dir))
    assert stopped_at < 500
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{stopped_at}"
    code, out = run(run_dir, synthetic_shards, stopped_at + 2, "checkpoint.every=0")
    assert code == 0, out[-4000:]
    assert f"at step {stopped_at}" in out
    assert max(r["step"] for r in metrics(run_dir)) == stopped_at + 2


def base_loads(out: str) -> list[int]:
    # By pattern, not by line start: a rank's line may follow another's progress bar.
    return [int(n) for n in re.findall(r"BASE_LOADS rank=\d+ n=(\d+)", out)]


# The large configs' precision and memory settings on the tiny model (issue 11).
PRODUCTION = ("train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true",
              "model.patcher=unet")


def test_production_settings_resume_bitwise_after_sigusr1_without_reloading_the_base(tmp_path, tiny_llama,
                                                                                     synthetic_shards):
    """bf16 + zero_init + activation checkpointing + U-Net on two ranks: a run stopped
    by SIGUSR1 at step 3 and resumed gives the uninterrupted run's losses bitwise. No
    process loads the base model more than once (its build): the frozen check is a
    digest, and a signal stop skips it."""
    steps, extra = 6, (*PRODUCTION, "checkpoint.every=0")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    # The reference and the run to be stopped overlap: most of a launch is start-up, and
    # this keeps the test within a few minutes on two shared cores. The second starts
    # once the first has trained a step, i.e. built its loader: streaming picks its
    # shared-memory prefix with no lock between jobs, and two runs building loaders at
    # the same instant can pick the same one (FileExistsError '/000NNN_locals', seen once).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        ref_proc = launch(ref_dir, synthetic_shards, steps, *extra, script=INSTRUMENTED, launcher="deepspeed")
        ref_done = pool.submit(ref_proc.communicate, timeout=600)  # drains its pipe meanwhile
        deadline = time.time() + 400
        while not (ref_dir / "metrics.jsonl").exists() and ref_proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        stopped = launch(run_dir, synthetic_shards, steps, *extra, script=INSTRUMENTED, launcher="deepspeed",
                         env={"MEGAFUSION_TEST_SIGUSR1_AT_STEP": "3"})
        out, _ = stopped.communicate(timeout=600)
        ref_out, _ = ref_done.result()
    assert ref_proc.returncode == 0, ref_out[-4000:]
    assert base_loads(ref_out) == [1, 1] and "frozen check:" in ref_out
    assert stopped.returncode == 0, out[-4000:]
    assert "stopped by signal after step 3" in out
    assert base_loads(out) == [1, 1], out[-4000:]
    assert "frozen check:" not in out
    assert (run_dir / "checkpoints" / "latest").read_text() == "global_step3"

    # The resume under torchrun: the launcher is not what is resumed, and DeepSpeed's
    # runner and launch.py import all of DeepSpeed twice (~15 s here) before a rank starts.
    code, out = run(run_dir, synthetic_shards, steps, *extra, script=INSTRUMENTED)
    assert code == 0, out[-4000:]
    assert "at step 3" in out and base_loads(out) == [1, 1] and "frozen check:" in out
    ref, rows = by_step(metrics(ref_dir)), by_step(metrics(run_dir))
    assert sorted(rows) == list(range(1, steps + 1))
    for s in range(1, steps + 1):
        for k in ("loss", "lm_loss", "diffusion_loss"):
            assert rows[s][k] == ref[s][k], (s, k, rows[s][k], ref[s][k])


def optimizer_tensors(tag_dir: Path, rank: int) -> dict:
    """Rank's fp32 master partitions and Adam state in a ZeRO-3 checkpoint."""
    import torch

    sd = torch.load(next(tag_dir.glob(f"zero_pp_rank_{rank}_*optim_states.pt")), weights_only=False)
    sd = sd["optimizer_state_dict"]
    out = {f"fp32.{i}": t for i, t in enumerate(sd["fp32_flat_groups"])}
    for key, state in sd["optimizer_state_dict"]["state"].items():
        out.update({f"{key}.{name}": t for name, t in state.items()})
    return out


def test_nan_step_with_gradient_accumulation_keeps_the_boundaries(tmp_path, tiny_llama, synthetic_shards):
    """GA=2, rank 0's loss NaN in the second micro-batch of step 3 only. The step is
    skipped whole on both ranks (weights and Adam state after step 3 are those after
    step 2), and the accumulation boundary stays on the optimiser step: a run resumed
    from the step-4 checkpoint (a fresh engine, whose micro-step counter starts at 0)
    gives the uninterrupted run's losses bitwise. Before, the skipped micro-batch
    shifted DeepSpeed's boundary by one for the rest of the run (step 4's update mixed
    step 3's first micro-batch with its own), which the resume undid."""
    import shutil

    import torch

    steps, extra = 6, ("train.gradient_accumulation=2", "checkpoint.every=1", "checkpoint.keep_last=0")
    ref_dir = tmp_path / "ref"
    code, out = run(ref_dir, synthetic_shards, steps, *extra, env={"MEGAFUSION_INJECT_NAN_STEPS": "3.2"})
    assert code == 0, out[-4000:]
    ref = by_step(metrics(ref_dir))
    assert [ref[s]["skipped"] for s in range(1, steps + 1)] == [False, False, True, False, False, False]
    ckpts = ref_dir / "checkpoints"
    for rank in (0, 1):
        before, skipped, after = (optimizer_tensors(ckpts / f"global_step{s}", rank) for s in (2, 3, 4))
        assert all(torch.equal(before[k], skipped[k]) for k in before), f"rank {rank}: the skipped step changed state"
        assert not any(torch.equal(skipped[k], after[k]) for k in skipped if k.startswith("fp32"))

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "global_step4", run_dir / "checkpoints" / "global_step4")
    (run_dir / "checkpoints" / "latest").write_text("global_step4")
    code, out = run(run_dir, synthetic_shards, steps, *extra, env={"MEGAFUSION_INJECT_NAN_STEPS": "3.2"})
    assert code == 0, out[-4000:]
    assert "at step 4" in out
    rows = by_step(metrics(run_dir))
    for s in (5, 6):
        for k in ("loss", "lm_loss", "diffusion_loss"):
            assert rows[s][k] == ref[s][k], (s, k, rows[s][k], ref[s][k])


def test_nan_loss_step_is_skipped_and_counted(tmp_path, tiny_llama, synthetic_shards):
    run_dir = tmp_path / "run"
    code, out = run(run_dir, synthetic_shards, 5, ranks=1, env={"MEGAFUSION_INJECT_NAN_STEPS": "3"})
    assert code == 0, out[-3000:]
    rows = by_step(metrics(run_dir))
    assert [rows[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (1, 2, 4, 5))  # finite, not NaN
    assert "step 3: non-finite loss, update skipped" in out


def test_too_many_nan_steps_stop_the_run(tmp_path, tiny_llama, synthetic_shards):
    run_dir = tmp_path / "run"
    code, out = run(run_dir, synthetic_shards, 8, "train.max_bad_steps=2", ranks=1,
                    env={"MEGAFUSION_INJECT_NAN_STEPS": "3,4,5"})
    assert code != 0
    assert "consecutive steps with a non-finite loss, the last at step 4" in out


@pytest.mark.parametrize("extra,expect", [
    (["parallel.pipeline_stages=2"], "parallel.pipeline_stages"),
    (["model.base=/nonexistent/llama"], "/nonexistent/llama"),
    (["data.train=/nonexistent/shards"], "/nonexistent/shards"),
    (["train.stesp=3"], "train.stesp"),
])
def test_bad_setups_fail_fast_with_one_line(tmp_path, tiny_llama, synthetic_shards, extra, expect):
    t0 = time.time()
    code, out = run(tmp_path / "run", synthetic_shards, 2, *extra, ranks=1, timeout=120)
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], out[-2000:]
    if "pipeline" in expect:
        assert "zero_stage" in errors[0]
    assert "Traceback" not in out
    assert time.time() - t0 < 60


def test_pipeline_two_stages_matches_single_process(tmp_path, tiny_llama, synthetic_shards):
    """Losses, and what the loader could not place: more samples per step than the rows
    hold, with no carry, so tokens are dropped every step. The two stages draw the same
    samples as the single process and count them once."""
    steps = 8
    crowded = ["data.samples_per_step=24", "data.overflow_carry_steps=0"]
    pipe_dir, single_dir = tmp_path / "pipe", tmp_path / "single"
    code, out = run(pipe_dir, synthetic_shards, steps, "parallel.pipeline_stages=2", "parallel.zero_stage=1",
                    "parallel.ds_config=ds_configs/pipeline_zero1.json", *crowded)
    assert code == 0, out[-4000:]
    code, out1 = run(single_dir, synthetic_shards, steps, "parallel.zero_stage=1",
                     "parallel.ds_config=ds_configs/pipeline_zero1.json", *crowded, ranks=1)
    assert code == 0, out1[-4000:]
    pipe, single = by_step(metrics(pipe_dir)), by_step(metrics(single_dir))
    for s in range(1, 4):
        for k in ("lm_loss", "diffusion_loss"):
            assert abs(pipe[s][k] - single[s][k]) <= 1e-3 * max(1.0, abs(single[s][k])), (s, k, pipe[s][k], single[s][k])
    assert pipe[steps]["diffusion_loss"] < pipe[1]["diffusion_loss"]
    dropped = [single[s]["dropped_tokens"] for s in range(1, steps + 1)]
    assert all(d > 0 for d in dropped), dropped
    assert [pipe[s]["dropped_tokens"] for s in range(1, steps + 1)] == dropped


@pytest.mark.parametrize("gather", ["whole", "module"])
def test_training_samples_match_sampling_the_checkpoint(tmp_path, tiny_llama, synthetic_shards, gather):
    """The grid and captions the trainer writes at step N under two-rank ZeRO-3 are what
    megafusion.generate gives for the step-N checkpoint (consolidated by zero_to_fp32, one
    process): same prompts, seed, steps and guidance. Both ways of having the weights:
    the whole model gathered, and one module at a time through DeepSpeed's hooks."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    prompts = ["a red circle", "a small blue square"]
    code, out = run(run_dir, synthetic_shards, 4, "log.tensorboard=true", "log.sample_every=4",
                    "log.sample_diffusion_steps=4", "log.sample_per_prompt=2", "log.sample_captions=2",
                    "log.sample_caption_tokens=6", "log.sample_guidance=2.0", f"log.sample_prompts={json.dumps(prompts)}",
                    f"log.sample_gather={gather}",
                    f"data.val={Path(synthetic_shards) / 'val'}")
    assert code == 0, out[-4000:]
    assert f"weights: {gather}" in out
    png = run_dir / "samples" / "step_0000004.png"
    trained = np.asarray(Image.open(png).convert("RGB")).astype(int)

    sys.path.insert(0, str(REPO))
    from megafusion import generate as G
    from megafusion.parallel.sampling import held_out_images
    from megafusion.config import load_config

    gen = G.load(run_dir)
    images = G.generate_image(gen, prompts, n=2, steps=4, cfg=2.0, seed=0, progress=False)
    want = np.asarray(G.image_grid(images, cols=2)).astype(int)
    assert trained.shape == want.shape
    assert np.abs(trained - want).max() <= 1, "the trainer's grid differs from sampling its checkpoint"
    cfg = load_config(str(run_dir / "config.yaml"))
    held = held_out_images(cfg, 2)
    captions = G.caption(gen, [im for _, im, _ in held], max_new_tokens=6)
    text = png.with_suffix(".txt").read_text()
    for (key, _, _), c in zip(held, captions):
        assert f"{key}: " in text and f"-> model {c!r}" in text

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/grid")] == [4]
    assert any("samples/captions" in tag for tag in acc.Tags()["tensors"])


def test_flat_gradients_equal_deepspeeds_own_reduction(tmp_path, tiny_llama, synthetic_shards):
    """Stage 0, two ranks, gradient accumulation 2, clipping that bites at every step:
    gradients summed in flat buffers the two ranks share in /dev/shm, then averaged
    and clipped in one pass (parallel.flat_gradients), against DeepSpeed's
    own flatten-reduce-copy-back over gloo and its own clip_grad_norm_. For two ranks the
    arithmetic is the same to the bit, so every step's losses and the final weights and
    Adam state are bitwise equal; the flat run also logs the norm it clipped by."""
    import torch

    clip = 0.05
    steps, extra = 4, ("parallel.zero_stage=0", "train.gradient_accumulation=2", "checkpoint.every=4",
                       f"train.grad_clip={clip}")
    dirs = {flag: tmp_path / f"flat_{flag}" for flag in ("true", "false")}
    outs = {}
    shm_files = lambda: (set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))  # noqa: E731
                         | set(Path("/dev/shm").glob(f"megafusion_grads_{os.getuid()}_*")))
    before = shm_files()
    for flag, run_dir in dirs.items():
        code, outs[flag] = run(run_dir, synthetic_shards, steps, *extra, f"parallel.flat_gradients={flag}")
        assert code == 0, outs[flag][-4000:]
    assert "summed in place in buffers the ranks share in /dev/shm" in outs["true"], outs["true"][-3000:]
    assert "summed in place" not in outs["false"]
    # The shared buffers are unlinked once mapped: nothing of the run is left in /dev/shm.
    assert shm_files() <= before, shm_files() - before
    # The memory report counts the flat buffer: fp32, one value per trainable parameter.
    trainable = int(re.search(r"parameters: [\d,]+ frozen, ([\d,]+) trainable", outs["true"]).group(1).replace(",", ""))
    grads_mib = float(re.search(r"this rank holds: .*?grads ([\d,.]+) MiB", outs["true"]).group(1).replace(",", ""))
    assert grads_mib == pytest.approx(4 * trainable / 2**20, abs=0.05), (grads_mib, trainable)
    flat, own = by_step(metrics(dirs["true"])), by_step(metrics(dirs["false"]))
    for s in range(1, steps + 1):
        for k in ("loss", "lm_loss", "diffusion_loss"):
            assert flat[s][k] == own[s][k], (s, k, flat[s][k], own[s][k])
        assert flat[s]["grad_norm"] > clip, (s, flat[s]["grad_norm"])  # the clip bit
    a, b = (stage0_tensors(d / "checkpoints" / f"global_step{steps}") for d in (dirs["true"], dirs["false"]))
    assert a.keys() == b.keys() and any(k.startswith("optimizer") for k in a) and any(k.startswith("module") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def stage0_tensors(tag_dir: Path) -> dict:
    """Every tensor of a stage-0 checkpoint (module weights, optimizer state), by path."""
    import torch

    sd = torch.load(next(tag_dir.glob("mp_rank_00_model_states.pt")), weights_only=False)
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("module", sd["module"])
    walk("optimizer", sd.get("optimizer"))
    return out


def test_pipeline_stops_on_a_non_finite_step_without_saving_it(tmp_path, tiny_llama, synthetic_shards):
    """Under pipeline stages DeepSpeed steps the optimizer inside train_batch, so a
    non-finite step cannot be skipped as under ZeRO. An lr of 1e30 makes step 1's update
    blow the weights up and step 2's loss non-finite: the run stops there with one line
    and exit 1, and the last checkpoint written (step 1) stays latest. Before, the log
    said "update skipped", fp32 applied the NaN update and went on to save it (bf16's
    optimizer failed an assert on every rank)."""
    run_dir = tmp_path / "pipe"
    code, out = run(run_dir, synthetic_shards, 4, "parallel.pipeline_stages=2", "parallel.zero_stage=1",
                    "parallel.ds_config=ds_configs/pipeline_zero1.json", "train.lr=1e30", "train.min_lr=0",
                    "checkpoint.every=1")
    assert code == 1, out[-4000:]
    assert "non-finite loss under pipeline stages" in out and "update skipped" not in out, out[-3000:]
    ckpts = run_dir / "checkpoints"
    bad_step = max(r["step"] for r in metrics(run_dir)) + 1 if metrics(run_dir) else 1
    assert (ckpts / "latest").read_text().strip() == f"global_step{bad_step - 1}", out[-3000:]
    assert not (ckpts / f"global_step{bad_step}").exists()
