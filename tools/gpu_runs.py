"""tools/gpu_check.py's `deepspeed` and `qwz` checks: `deepspeed --num_gpus 1
megafusion/train.py` on configs/tiny.yaml with the large configs' settings, an
uninterrupted run against one resumed from its checkpoint, and ZeRO++'s int8 weight
gathers against exact ones."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megafusion.parallel.launch import free_port
from tools.gpu_harness import log

REPO = Path(__file__).resolve().parent.parent


def launch(cmd: list[str], env: dict, log_file: Path, timeout: int) -> str:
    with open(log_file, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
    out = log_file.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"exit status {p.returncode} of {' '.join(cmd[:6])} ...; output ends:\n{out[-3000:]}")
    return out


# The large configs' settings. Both deepspeed runs are 10 steps, so any schedule would
# match; a constant lr after warmup keeps the comparison valid if either length changes.
LARGE_SETTINGS = ["train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true",
                  "train.schedule=constant", "checkpoint.every=5", "checkpoint.keep_last=0", "log.tensorboard=false"]


@dataclasses.dataclass
class TinyRuns:
    """`deepspeed --num_gpus 1 megafusion/train.py` on configs/tiny.yaml, on the tiny Llama
    and synthetic shards, in `tmp`; shared by the deepspeed and qwz checks."""

    device: torch.device
    s: dict
    tmp: Path
    wheels: Path | None

    def __post_init__(self):
        cuda = self.device.type == "cuda"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cuda" if cuda else "cpu")
        if cuda:
            self.env["NCCL_DEBUG"] = "VERSION"  # NCCL prints its version when a communicator starts
        w = self.wheels
        self.base = w / "tiny-llama" if w is not None and (w / "tiny-llama").is_dir() else self.tmp / "tiny-llama"
        self.shards = self.tmp / "shards"

    def prepare(self) -> None:
        if not (self.base / "config.json").is_file():
            from tools.make_tiny_llama import make_tiny_llama

            make_tiny_llama(self.base, seed=0)
        if not (self.shards / "index.json").is_file():
            launch([sys.executable, str(REPO / "tools" / "prepare_data.py"), "synthetic", "--out", str(self.shards),
                    "--n", "200", "--seed", "0"], self.env, self.tmp / "prepare_data.log", self.s["run_timeout"])

    def train(self, run: str, steps: int, *extra: str, timeout: int | None = None) -> str:
        self.prepare()
        port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
               str(REPO / "megafusion" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
               f"model.base={self.base}", f"data.train={self.shards}", f"data.cache_root={self.tmp / 'cache'}",
               f"data.run_id={run}-{os.getpid()}", f"run.dir={self.tmp / run}", f"train.steps={steps}",
               *LARGE_SETTINGS, *extra]
        log(f"deepspeed: {run}, {steps} steps")
        try:
            return launch(cmd, self.env, self.tmp / f"{run}-{steps}.log", timeout or self.s["run_timeout"])
        finally:  # the CPU shm op leaves its buffers in /dev/shm, named by port
            for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
                f.unlink(missing_ok=True)

    def losses(self, run: str) -> dict:
        rows = [json.loads(line) for line in (self.tmp / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows}  # a resumed run appends: the last record per step


def check_deepspeed(runs: TinyRuns) -> dict:
    cuda, tmp, env = runs.device.type == "cuda", runs.tmp, runs.env
    train, losses, settings, base = runs.train, runs.losses, LARGE_SETTINGS, runs.base

    out_a = train("uninterrupted", 10)
    # The resume starts from the uninterrupted run's own step-5 checkpoint, copied to a new
    # run directory as a run stopped after step 5 leaves it: one launch fewer (~30 s of a
    # dry run, and GPU time) than training a second run to 5 first.
    ckpts = tmp / "resumed" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(tmp / "uninterrupted" / "checkpoints" / "global_step5", ckpts / "global_step5")
    (ckpts / "latest").write_text("global_step5")
    out_b = train("resumed", 10)
    a, b = losses("uninterrupted"), losses("resumed")
    keys = ("loss", "lm_loss", "diffusion_loss")
    rtol = 1e-2 if cuda else 0.0  # CUDA's atomics (index_add in backward) make runs differ in the last bits
    diff = max(abs(a[i][k] - b[i][k]) / max(1e-12, abs(a[i][k])) for i in b for k in keys)
    result = {
        "settings": settings, "accelerator": env["DS_ACCELERATOR"], "base": str(base),
        "losses_uninterrupted": [a[i]["loss"] for i in sorted(a)], "losses_resumed": [b[i]["loss"] for i in sorted(b)],
        "max_rel_diff": diff, "rtol": rtol, "bitwise": diff == 0.0,
        "resumed_at_step_5": "resumed from" in out_b and "at step 5" in out_b,
        "checkpoints": sorted(p.name for p in (tmp / "resumed" / "checkpoints").glob("global_step*")),
    }
    if cuda:
        result["nccl_started"] = "NCCL version" in out_a
    # The start-up fit check (megafusion/plan/fit_check.py) reads the device's memory on
    # CUDA: the tiny model fits any GPU, so a warning here is a wrong reading.
    result["fit_warning"] = "warning: tools/plan.py estimates" in out_a
    trained = a[10]["diffusion_loss"] < a[1]["diffusion_loss"] and not any(r["skipped"] for r in a.values())
    finite = all(math.isfinite(a[i][k]) for i in a for k in keys)
    result["ok"] = (sorted(a) == list(range(1, 11)) and sorted(b) == list(range(6, 11)) and diff <= rtol
                    and result["resumed_at_step_5"] and trained and finite and not result["fit_warning"])
    return result


def check_qwz(runs: TinyRuns) -> dict:
    """ZeRO++ qwZ, ds_configs/zero3_llama3_70b.json's int8 weight gathers, against exact
    gathers on the same tiny run: DeepSpeed's CUDA quantizer kernel (JIT-built by the
    first run that uses it) in the forward, recompute and backward passes. The
    persistence threshold is 0 so that every tiny weight is gathered, as every 70B
    matrix is. On the CPU the kernel does not exist (the trainer refuses qwZ; the suite
    runs DeepSpeed's quantizer code with a stand-in kernel, tests/parallel/test_qwz.py):
    the dry run trains the exact side alone."""
    cuda = runs.device.type == "cuda"
    steps = 6

    def ds_json(qwz: bool) -> Path:
        ds = json.loads((REPO / "ds_configs" / "zero3_llama3_70b.json").read_text())
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, zero_quantized_weights=qwz)
        path = runs.tmp / ("qwz.json" if qwz else "exact.json")
        path.write_text(json.dumps(ds))
        return path

    runs.train("exact", steps, f"parallel.ds_config={ds_json(False)}", "checkpoint.every=0")
    exact = [runs.losses("exact")[i]["loss"] for i in range(1, steps + 1)]
    result = {"steps": steps, "losses_exact": exact}
    if not cuda:
        return dict(result, skipped="the quantizer kernel needs CUDA", ok=len(exact) == steps)
    t0 = time.time()
    out = runs.train("qwz", steps, f"parallel.ds_config={ds_json(True)}", "checkpoint.every=0", timeout=600)
    got = [runs.losses("qwz")[i]["loss"] for i in range(1, steps + 1)]
    diff = max(abs(g - e) / abs(e) for g, e in zip(got, exact))
    # DeepSpeed's op builder prints this when CUDAQuantizer loads its kernel (built or
    # cached): the evidence that qwZ was on. Unequal losses would not be: two exact CUDA
    # runs already differ in the last bits (index_add's atomics).
    loaded = "Time to load quantizer op" in out
    # int8 per group of up to 8k weights moves each weight by at most 1/254 of its
    # group's largest; on CPU ranks with a stand-in kernel the losses moved 0.03%.
    return dict(result, losses_qwz=got, max_rel_diff=diff, rtol=0.02, quantizer_loaded=loaded,
                seconds_with_kernel_build=round(time.time() - t0, 1), ok=diff <= 0.02 and loaded)

