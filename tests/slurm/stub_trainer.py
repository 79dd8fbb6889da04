"""A stand-in for megafusion/train.py with the same launch contract, for testing slurm/.

    python stub_trainer.py --config CONFIG.yaml [section.key=value ...]

Like the real trainer it reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR
and MASTER_PORT (all required: checking the launch environment is the point), meets the
other ranks through a gloo rendezvous at MASTER_ADDR:MASTER_PORT, trains `train.steps`
steps of a small linear regression whose gradients are all-reduced (so every loss depends
on every rank), writes checkpoints in DeepSpeed's layout (run.dir/checkpoints/global_stepN/
plus a `latest` file) every `checkpoint.every` steps and at the end, appends
{"step", "loss"} lines to run.dir/metrics.jsonl as the trainer does, and resumes from
`latest`. On SIGUSR1 or SIGTERM every rank checkpoints at the next step boundary and exits
0. Each step sleeps $STUB_STEP_SECONDS (default 0.2) so that a test can signal mid-run.

A crash, as a GPU fault or an NCCL timeout ends a rank (a non-zero exit, no signal):
$STUB_CRASH_AFTER_STEPS=K makes rank $STUB_CRASH_RANK (default 1) exit with status 3
after K steps of the current attempt, in attempts whose SLURM_RESTART_COUNT is below
$STUB_CRASH_ATTEMPTS (default: every attempt).

The loss sequence is a function of the step number only, so an interrupted and resumed
run reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def load_settings(config: str, overrides: list[str]) -> dict:
    with open(config) as f:
        cfg = yaml.safe_load(f) or {}
    flat = {}
    for section, values in cfg.items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            sys.exit(f"stub_trainer: bad override {item!r} (expected section.key=value)")
        flat[key] = yaml.safe_load(value) if value else ""
    return flat


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    missing = [name for name in REQUIRED_ENV if not os.environ.get(name)]
    if missing:
        sys.exit(f"stub_trainer: launch environment lacks {', '.join(missing)}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])

    settings = load_settings(args.config, args.overrides)
    run_dir = Path(os.path.expandvars(str(settings.get("run.dir", "runs/default"))))
    steps = int(settings.get("train.steps", 10))
    every = int(settings.get("checkpoint.every", 0) or 0)
    step_seconds = float(os.environ.get("STUB_STEP_SECONDS", "0.2"))
    ckpt_dir = run_dir / "checkpoints"

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    print(f"stub_trainer: rank {rank}/{world} local {local_rank}/{local_world} "
          f"node {os.environ.get('SLURMD_NODENAME', socket.gethostname())} "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
          f"DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '')} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} "
          f"nccl={','.join(f'{k}={v}' for k, v in sorted(os.environ.items()) if 'NCCL' in k)} "
          f"config={args.config} overrides={' '.join(args.overrides)}", flush=True)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))

    torch.manual_seed(0)
    weight = torch.zeros(8)
    start = 0
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        state = torch.load(ckpt_dir / tag / f"rank{rank}.pt")
        weight, start = state["weight"], state["step"]
        print(f"stub_trainer: rank {rank} resumed from {tag} at step {start}", flush=True)

    metrics = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(run_dir / "metrics.jsonl", "a")
    target = torch.linspace(-1, 1, 8)

    def save(step: int) -> None:
        tag = f"global_step{step}"
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"weight": weight, "step": step}, ckpt_dir / tag / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            tmp.replace(latest)
        dist.barrier()
        print(f"stub_trainer: rank {rank} saved checkpoint {tag}", flush=True)

    crash_after = int(os.environ.get("STUB_CRASH_AFTER_STEPS", "0") or 0)
    attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    crash = (crash_after > 0 and rank == int(os.environ.get("STUB_CRASH_RANK", "1"))
             and attempt < int(os.environ.get("STUB_CRASH_ATTEMPTS", "1000000")))

    step = start
    while step < steps:
        if crash and step - start == crash_after:
            print(f"stub_trainer: rank {rank} crashing at step {step} (attempt {attempt})", flush=True)
            os._exit(3)
        # Each rank draws its own batch for this step; the data depend only on (step, rank).
        gen = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(4, 8, generator=gen)
        y = x @ target
        w = weight.clone().requires_grad_(True)
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        loss_sum = loss.detach().clone()
        dist.all_reduce(loss_sum)
        weight = weight - 0.05 * grad / world
        step += 1
        mean_loss = loss_sum.item() / world
        print(f"stub_trainer: rank {rank} step {step}/{steps} loss {mean_loss:.6f}", flush=True)
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "loss": mean_loss}) + "\n")
            metrics.flush()
        time.sleep(step_seconds)
        # Stop together: a signal may reach the ranks at different steps.
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and step < steps:
            print(f"stub_trainer: rank {rank} got {stop['signal'] or 'a peer signal'}; "
                  f"checkpointing at step {step} and exiting", flush=True)
            save(step)
            dist.destroy_process_group()
            return 0
        if every and step % every == 0 and step < steps:
            save(step)

    save(step)
    if metrics is not None:
        metrics.close()
    print(f"stub_trainer: rank {rank} finished {steps} steps", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
