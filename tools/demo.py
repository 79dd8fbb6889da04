"""`make demo`: the CPU demo end to end.

Writes the synthetic shapes shards (once), trains configs/demo.yaml on two CPU ranks
under the deepspeed launcher with ZeRO-3, and prints the first and last losses and where
the logs and checkpoints are. Extra arguments are passed to the trainer as overrides
(for example `python tools/demo.py train.steps=50`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MEGAFUSION_DATA", REPO / "data")) / "synthetic"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_shards() -> None:
    # prepare_data writes the held-out split beside the training shards, in train/val.
    if (DATA / "train" / "index.json").is_file() and (DATA / "train" / "val" / "index.json").is_file():
        return
    subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), "synthetic", "--out", str(DATA / "train"),
                    "--n", "20000", "--val-n", "256", "--seed", "0", "--overwrite"], check=True)


def mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) == r.get(key)]
    return sum(vals) / max(len(vals), 1)


def main(argv: list[str]) -> int:
    ensure_shards()
    run_dir = REPO / "runs" / "demo"
    overrides = [f"data.train={DATA / 'train'}", f"data.val={DATA / 'train' / 'val'}", f"run.dir={run_dir}", *argv]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "megafusion/train.py"),
           "--config", str(REPO / "configs/demo.yaml"), *overrides]
    print("+", " ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=REPO, env=env)
    if code != 0:
        print(f"demo: training failed with exit code {code}", file=sys.stderr)
        return code
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    k = max(1, min(20, len(rows) // 5))
    first, last = rows[:k], rows[-k:]
    print()
    print(f"diffusion loss: {mean(first, 'diffusion_loss'):.4f} (first {k} steps) -> {mean(last, 'diffusion_loss'):.4f} (last {k})")
    print(f"caption (LM) loss: {mean(first, 'lm_loss'):.4f} (first {k} steps) -> {mean(last, 'lm_loss'):.4f} (last {k})")
    print(f"tensorboard:  .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoints:  {run_dir / 'checkpoints'}")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
