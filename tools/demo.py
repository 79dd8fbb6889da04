"""`make demo`: the CPU demo end to end.

Writes the synthetic shapes shards (once), trains configs/demo.yaml on two CPU ranks
under the deepspeed launcher with ZeRO-3, prints the first and last losses, exports the
run as a Hugging Face directory (tools/convert_to_hf.py), samples a 4x4 grid for four
fixed prompts, captions four held-out images, and prints where everything is. Extra arguments are passed to the trainer as overrides
(for example `python tools/demo.py train.steps=50`).
"""
from __future__ import annotations

import json
import os
import shutil
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
    vals = [r[key] for r in rows if r.get(key) is not None and r.get(key) == r.get(key)]
    return sum(vals) / max(len(vals), 1)


PROMPTS = ["a red circle", "a large blue square", "a green triangle above a small yellow circle",
           "a small purple square"]


def export_and_sample(run_dir: Path) -> None:
    """Export the run, then sample from the export with plain megafusion.generate."""
    hf_dir, samples = run_dir / "hf", run_dir / "samples"
    subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(run_dir), str(hf_dir), "--overwrite"],
                   check=True)
    sys.path.insert(0, str(REPO))
    from streaming import StreamingDataset

    from megafusion import generate as G
    from PIL import Image
    import io

    gen = G.load(hf_dir)
    samples.mkdir(parents=True, exist_ok=True)
    images = G.generate_image(gen, PROMPTS, n=4, steps=50, seed=0)  # prompt-major: one row per prompt
    G.image_grid([im.resize((96, 96), Image.NEAREST) for im in images], cols=4).save(samples / "grid.png")
    val = StreamingDataset(local=str(DATA / "train" / "val"), shuffle=False, batch_size=1)
    held_out = [val[i] for i in range(4)]
    captions = G.caption(gen, [Image.open(io.BytesIO(r["image"])).convert("RGB") for r in held_out],
                         max_new_tokens=24)
    lines = [f"prompts (grid rows, top to bottom): {PROMPTS}"]
    for r, c in zip(held_out, captions):
        lines.append(f"{r['id']}: true caption {r['caption']!r} -> model {c!r}")
    (samples / "captions.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"exported model: {hf_dir}")
    print(f"sample grid:    {samples / 'grid.png'}")
    print(f"captions:       {samples / 'captions.txt'}")


def main(argv: list[str]) -> int:
    ensure_shards()
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
    run_dir = Path(given[-1]).expanduser().resolve() if given else REPO / "runs" / "demo"
    if run_dir.exists() and not given:
        # The demo is a fresh run each time (the trainer would otherwise resume it and
        # find nothing left to do); real runs keep their directory to resume from.
        print(f"demo: removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    overrides = [f"data.train={DATA / 'train'}", f"data.val={DATA / 'train' / 'val'}", f"run.dir={run_dir}", *argv]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--log_level", "warning",
           str(REPO / "megafusion/train.py"),
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
    print(f"caption loss:   {mean(first, 'caption_loss'):.4f} (first {k} steps) -> {mean(last, 'caption_loss'):.4f} (last {k})"
          "  (LM loss on text after an image: what the image tower can lower)")
    print(f"all text (LM):  {mean(first, 'lm_loss'):.4f} (first {k} steps) -> {mean(last, 'lm_loss'):.4f} (last {k})"
          "  (mostly captions before their image, read by the frozen text tower)")
    export_and_sample(run_dir)
    print(f"tensorboard:  .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoints:  {run_dir / 'checkpoints'}")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
