"""The bench entries of the demo (configs/demo.yaml), registered in tools/bench.py.

    loader_vs_train_step   loader throughput / the samples per second one demo step consumes
    demo_step_vs_compute   wall clock of one demo training step on two ranks under the
                           deepspeed launcher / one thread's CPU time of one rank's
                           forward + backward

Both read configs/demo.yaml as it is when they run (a snapshot of it, so that an edit
during the run cannot give the two sides of a ratio different settings), write the
synthetic shapes shards at its image size to a temporary directory, and build one rank's
loader (DistEnv(0, 1, 0, 1)) over them. tools/bench.py calls register(itself) after its
helpers are defined; this module imports nothing from it, so that it works whether
bench.py runs as a script (__main__) or is imported.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
WARMUP_STEPS = 2  # launcher run: steps left out of the median (compilation, first allocations)
QUICK_STEPS = 4  # launcher run with --quick: two measured steps
RANKS = 2

_bench = None  # tools/bench.py's module, set by register()


def register(bench) -> None:
    """Register this module's entries with tools/bench.py's @benchmark, in this order,
    giving them its helpers (base_llama, interleaved, ...)."""
    global _bench
    _bench = bench
    bench.benchmark("loader_vs_train_step")(loader_vs_train_step)
    bench.benchmark("demo_step_vs_compute")(demo_step_vs_compute)


# ---------------------------------------------------------------------- shared parts

def snapshot_config(tmp: Path, source: Path = DEMO_CONFIG) -> tuple[Path, str]:
    """Copy the demo config into tmp; returns the copy and the sha1 of its text."""
    text = source.read_text()
    path = tmp / source.name
    path.write_text(text)
    return path, hashlib.sha1(text.encode()).hexdigest()[:12]


def write_demo_shards(cfg, out: Path, n: int) -> None:
    from megafusion.data.prepare import write_synthetic

    write_synthetic(str(out), n, cfg.model.image_size, seed=0)


def one_rank_loader(cfg, shards: Path, cache_root: Path, epoch_size: int, model, run_id: str):
    """The train loader of configs/demo.yaml's data section for one rank of one, over
    `shards`, in this process (no workers), `epoch_size` samples per epoch."""
    from megafusion.data.dist_env import DistEnv
    from megafusion.data.loader import build_train_loader
    from megafusion.model.loading import load_tokenizer

    data = copy.deepcopy(cfg.data)  # the caller's config keeps its settings
    data.train, data.val, data.cache_root, data.run_id = str(shards), None, str(cache_root), run_id
    data.num_workers, data.epoch_size = 0, epoch_size
    return build_train_loader(data, cfg.model, load_tokenizer("smollm2"), model.tokens_per_image,
                              DistEnv(0, 1, 0, 1), vocab_size=model.vocab_size)


def unique_run_id(what: str) -> str:
    return f"bench-{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------ loader_vs_train_step

def loader_vs_train_step(ctx) -> dict:
    """Loader throughput / the samples per second one demo-config training step consumes,
    both on one rank: configs/demo.yaml's data and model sections (seq_len, rows per
    step, image size and patching), SmolLM2's dimensions with random weights, forward
    + backward + AdamW step on the loader's own batches. Goal >= 10: the loader must never
    be what a run waits for."""
    import torch

    from megafusion.config import load_config
    from megafusion.model.fusion import LMFusionModel

    tmp = Path(tempfile.mkdtemp(prefix="megafusion-bench-"))
    try:
        cfg = load_config(snapshot_config(tmp)[0])
        n = 256 if ctx.quick else 1024
        write_demo_shards(cfg, tmp / "shards", n)
        model = LMFusionModel(_bench.base_llama(ctx), cfg.model).train()
        loader = one_rank_loader(cfg, tmp / "shards", tmp / "cache", n, model, unique_run_id("loader"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        batches = list(loader)  # one epoch, read to the end (streaming's threads finish)
        load_rates, step_rates = [], []
        for r in range(ctx.repeats + 1):
            t0 = time.process_time()
            count = sum(b.num_samples for b in loader)
            load_rate = count / (time.process_time() - t0)
            batch = batches[r % len(batches)]
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            model(batch.packed()).loss.backward()
            opt.step()
            step_rate = batch.num_samples / (time.process_time() - t0)
            if r:  # the first round warms up both
                load_rates.append(load_rate)
                step_rates.append(step_rate)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lr, sr = statistics.median(load_rates), statistics.median(step_rates)
    ratio = lr / sr
    return {"value": round(ratio, 1), "unit": "x", "goal": ">= 10", "met": ratio >= 10,
            "loader_samples_per_s": round(lr, 1), "train_samples_per_s": round(sr, 2),
            "samples_per_step": batches[0].num_samples,
            "what": "one rank, CPU time; demo config's data and model sections"}


# ------------------------------------------------------------ demo_step_vs_compute

def demo_settings(cfg, samples_per_step: int | None = None) -> dict:
    """What decides the cost of a demo step, as read from the config."""
    p, t, d, m = cfg.parallel, cfg.train, cfg.data, cfg.model
    out = {
        "ranks": RANKS,
        "zero_stage": p.zero_stage, "pipeline_stages": p.pipeline_stages, "ds_config": p.ds_config,
        "zero_init": p.zero_init,
        "gradient_accumulation": t.gradient_accumulation, "micro_batch_size": t.micro_batch_size,
        "dtype": t.dtype,
        "samples_per_step": d.samples_per_step, "rows_per_micro_batch": d.batch_size, "seq_len": d.seq_len,
        "num_workers": d.num_workers,
        "base": m.base, "image_mode": m.image_mode, "image_size": m.image_size, "patch_size": m.patch_size,
        "patcher": m.patcher, "activation_checkpointing": m.activation_checkpointing,
    }
    if samples_per_step is not None:
        out["samples_per_step_resolved"] = samples_per_step
    return out


def launch_command(config: Path, shards: Path, run_dir: Path, cache_root: Path, steps: int, port: int,
                   run_id: str) -> list[str]:
    """The demo's training as tools/demo.py launches it (two ranks, the deepspeed launcher,
    the config's own parallel settings), without sampling, validation, tensorboard or
    intermediate checkpoints, for `steps` optimiser steps on the given shards."""
    from megafusion.parallel.launch import local_deepspeed_command

    return [*local_deepspeed_command(RANKS, str(Path(sys.executable).parent / "deepspeed"), port),
            str(REPO / "megafusion" / "train.py"), "--config", str(config),
            f"run.dir={run_dir}", f"data.train={shards}", "data.val=null", f"data.run_id={run_id}",
            f"data.cache_root={cache_root}", "log.sample_every=0", "log.val_every=0", "checkpoint.every=0",
            "log.tensorboard=false", f"train.steps={steps}"]


def measured_step_s(metrics: Path, warmup: int = WARMUP_STEPS) -> tuple[list[float], list[float]]:
    """step_s of <run.dir>/metrics.jsonl: (warm-up steps, measured steps after them), in
    step order; the last record of a step counts (a resumed run repeats steps)."""
    rows = {}
    for line in metrics.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    times = [float(rows[s]["step_s"]) for s in sorted(rows)]
    return times[:warmup], times[warmup:]


def _launcher_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    # tools/bench.py sets OMP_WAIT_POLICY=PASSIVE for its own threads; the demo runs
    # without it (unless the caller's environment had it).
    if _bench is not None and getattr(_bench, "OMP_WAIT_POLICY_SET_HERE", False):
        env.pop("OMP_WAIT_POLICY", None)
    return env


def run_demo_training(cmd: list[str], port: int, log: Path, timeout: float) -> None:
    """Run the launcher to the end; its output goes to `log`. Raises RuntimeError (first
    line: the exit status and the last line of the output) when it fails or times out.
    Removes the /dev/shm allreduce buffers DeepSpeed's CPU backend leaves behind, by this
    run's port only."""
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=_launcher_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc = f"timeout after {timeout:.0f} s"
    finally:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            try:
                path.unlink()
            except OSError:
                pass
    if rc != 0:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
        errors = [l for l in lines if "error" in l.lower()]
        last = (errors or lines or ["(no output)"])[-1]
        raise RuntimeError(f"demo training on {RANKS} ranks failed ({rc}): {last[:300]}")


def one_thread_compute(ctx, cfg, shards: Path, cache_root: Path, ga: int,
                       repeats: int) -> tuple[list[float], list[float], dict]:
    """CPU and wall seconds of the forward + backward of one rank's optimiser step
    (`ga` micro-batches of the loader's batches, no optimiser step) on one thread, one
    per round after a warm-up; each round takes the next batches. SmolLM2's dimensions at
    full depth (what the launcher trains), random weights, the config's model section."""
    import torch
    from transformers import LlamaForCausalLM

    from megafusion.data.loader import default_samples_per_step
    from megafusion.model.fusion import LMFusionModel

    config = copy.deepcopy(_bench.llama_config(ctx))
    config.num_hidden_layers = ctx.meta["full_depth_layers"]  # --quick / --layers do not apply
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model = LMFusionModel(base, cfg.model).train()
    sps = default_samples_per_step(cfg.data, model.tokens_per_image)
    rounds = repeats + 1
    # The whole shards as the epoch: an epoch shorter than the loader's canonical node
    # count (64) is refused by streaming; only the first ga * rounds batches are drawn.
    loader = one_rank_loader(cfg, shards, cache_root, None, model, unique_run_id("compute"))
    batches = [b.packed() for b in itertools.islice(loader, ga * rounds)]
    if len(batches) < ga * rounds:
        raise RuntimeError(f"the loader gave {len(batches)} batches, {ga * rounds} needed")
    tokens = [int(b.input_ids.numel()) for b in batches]
    image_tokens = [int((b.modality == 1).sum()) for b in batches]
    it = iter(range(rounds))

    def step():
        r = next(it)
        for batch in batches[r * ga:(r + 1) * ga]:
            model(batch).loss.backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = _bench.interleaved({"compute": step}, repeats, setup=_bench.drop_grads(model))
    finally:
        torch.set_num_threads(threads)
    info = {"samples_per_step": sps, "layers": config.num_hidden_layers,
            "tokens_per_rank_step": sum(tokens[:ga]),
            "image_tokens_per_rank_step": [sum(image_tokens[r * ga:(r + 1) * ga]) for r in range(rounds)]}
    return times.cpu["compute"], times.wall["compute"], info


def demo_step_vs_compute(ctx) -> dict:
    """Wall clock of one demo training step on two CPU ranks under the deepspeed
    launcher, with configs/demo.yaml's parallel, train, data and model settings (median
    step_s of metrics.jsonl after the first 2 steps) / one thread's CPU time of the
    forward + backward of one rank's tokens for that step (gradient_accumulation
    micro-batches of the loader's batches, no optimiser step), in this process, half of
    its rounds before the launcher run and half after: what each rank would take with no
    communication and no contention. Goal <= 1.3. The launcher
    loads the real SmolLM2 at full depth, so the compute side does too, whatever --quick
    and --layers say; --quick only shortens the run to 4 steps."""
    from megafusion.config import load_config

    tmp = Path(tempfile.mkdtemp(prefix="megafusion-bench-demo-"))
    try:
        config, sha = snapshot_config(tmp)
        cfg = load_config(config)
        if cfg.model.base != "smollm2":
            raise _bench.Skip(f"configs/demo.yaml's model.base is {cfg.model.base!r}; the compute side has "
                              "SmolLM2's dimensions only")
        ga = cfg.train.gradient_accumulation
        steps = QUICK_STEPS if ctx.quick else WARMUP_STEPS + max(4, 2 * ctx.repeats)
        # Enough samples that neither side reaches the end of an epoch.
        sps_guess = max(8, cfg.data.samples_per_step or 0)
        n = max(256, 2 * sps_guess * ga * max(RANKS * steps, ctx.repeats + 1))
        write_demo_shards(cfg, tmp / "shards", n)

        # The compute side's rounds bracket the launcher run, half before and half after,
        # so that a drift of the shared host's speed over the minutes of the run hits both
        # sides alike (the rest of the bench interleaves its variants for the same
        # reason); measured 2026-12-03, the compute side alone moved 2.53-3.13 s between
        # runs. Each half's model is gone before the ranks load theirs.
        before = (ctx.repeats + 1) // 2
        cpu, wall, info = one_thread_compute(ctx, cfg, tmp / "shards", tmp / "cache", ga, before)
        compute_before = list(cpu)
        gc.collect()

        from megafusion.parallel.launch import free_port

        port, run_dir = free_port(), tmp / "run"
        cmd = launch_command(config, tmp / "shards", run_dir, tmp / "cache", steps, port, unique_run_id("demo"))
        run_demo_training(cmd, port, tmp / "launch.log", timeout=600 + 120 * steps)
        warm, step_s = measured_step_s(run_dir / "metrics.jsonl")
        if not step_s:
            raise RuntimeError(f"metrics.jsonl has {len(warm)} steps, none after the {WARMUP_STEPS} warm-up steps")
        if ctx.repeats - before > 0:
            more_cpu, more_wall, _ = one_thread_compute(ctx, cfg, tmp / "shards", tmp / "cache", ga,
                                                        ctx.repeats - before)
            cpu, wall = cpu + more_cpu, wall + more_wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step_med, compute_med = statistics.median(step_s), statistics.median(cpu)
    value = step_med / compute_med
    goal = 1.3
    return {
        "value": round(value, 4),
        "unit": "ratio",
        "ratio_of": "median step_s (wall clock, 2 ranks, launcher) / median compute s (CPU time, 1 thread)",
        "goal": goal,
        "met": bool(value <= goal),
        "median_step_s": round(step_med, 4),
        "median_compute_s": round(compute_med, 4),
        "median_compute_wall_s": round(statistics.median(wall), 4),
        "median_s": {"step_2_ranks_wall": round(step_med, 4), "compute_1_thread_cpu": round(compute_med, 4)},
        # Smallest and largest measured step over the compute median: how noisy the run was.
        "spread": [round(min(step_s) / compute_med, 4), round(max(step_s) / compute_med, 4)],
        "step_s": [round(s, 4) for s in step_s],
        "warmup_step_s": [round(s, 4) for s in warm],
        "compute_s": [round(s, 4) for s in cpu],
        "compute_s_before_launch": [round(s, 4) for s in compute_before],
        "steps": len(warm) + len(step_s),
        "parallel": demo_settings(cfg, info["samples_per_step"]),
        "config": f"configs/demo.yaml (sha1 {sha})",
        "layers": info["layers"],
        "tokens_per_rank_step": info["tokens_per_rank_step"],
        "image_tokens_per_rank_step": info["image_tokens_per_rank_step"],
        "what": "numerator: megafusion/train.py under `deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu); "
                "denominator: forward + backward of gradient_accumulation loader batches, one thread, "
                "random SmolLM2 weights, no optimiser step",
    }
