"""`make demo`: the CPU demo end to end.

Writes the synthetic shapes shards at the config's image size (once), trains
configs/demo.yaml on two CPU ranks under the deepspeed launcher, prints the first and
last losses, exports the run as a Hugging Face directory (tools/convert_to_hf.py),
samples a 4x4 grid for four fixed prompts, captions four held-out images, scores the
export on held-out samples with tools/evaluate.py shapes' code (drawing from held-out
captions and captioning held-out images, judged by the deterministic analyser of
megafusion/eval/shapes.py), and prints where everything is and how long each part took.
Extra arguments are passed to the trainer as overrides (for example
`python tools/demo.py train.steps=50`); MEGAFUSION_DEMO_EVAL_N sets how many held-out
samples are scored (default 64).

`--long` (`make demo-long`) is the longer recipe: the same config trained LONG_STEPS
steps (about 2 hours on a 2-core machine) in runs/demo-long, scoring 64 held-out samples
at each sample point (log.sample_eval_n) and drawing the learning curve
(tools/learning_curve.py) at the end. Unlike the short demo it resumes: run it again
after an interruption and it continues from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("MEGAFUSION_DATA", REPO / "data")) / "synthetic"


def shard_image_size(path: Path) -> int | None:
    """Side of the first image in the shards at path; None when there are none."""
    sys.path.insert(0, str(REPO))
    from megafusion.eval.rows import EvalError, read_shards

    try:
        row = read_shards(path, 1)[0]
    except EvalError:
        return None
    from PIL import Image
    import io

    return Image.open(io.BytesIO(row["image"])).size[0]


def ensure_shards(size: int) -> None:
    """The synthetic shards at `size` pixels; written again when they are missing or were
    written at another size (a previous demo's config). prepare_data writes the held-out
    split beside the training shards, in train/val."""
    if shard_image_size(DATA / "train") == size and shard_image_size(DATA / "train" / "val") == size:
        return
    subprocess.run([sys.executable, str(REPO / "tools/prepare_data.py"), "synthetic", "--out", str(DATA / "train"),
                    "--n", "20000", "--val-n", "256", "--size", str(size), "--seed", "0", "--overwrite"], check=True)


def demo_config(argv: list[str]):
    """configs/demo.yaml with the overrides, every argument one (section.field=value): a
    bad one raises ConfigError, before anything is written, removed or launched."""
    sys.path.insert(0, str(REPO))
    from megafusion.config import load_config

    return load_config(REPO / "configs/demo.yaml", argv)


def mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and r.get(key) == r.get(key)]
    return sum(vals) / max(len(vals), 1)


PROMPTS = ["a red circle", "a large blue square", "a green triangle above a small yellow circle",
           "a small purple square"]


def export_and_sample(run_dir: Path, steps: int, guidance: float) -> None:
    """Export the run, then sample from the export with plain megafusion.generate."""
    hf_dir, samples = run_dir / "hf", run_dir / "samples"
    # convert_to_hf prints the export's path; the summary below names it with the rest.
    subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(run_dir), str(hf_dir), "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(REPO))
    from megafusion import generate as G
    from megafusion.eval.rows import read_shards
    from PIL import Image
    import io

    gen = G.load(hf_dir)
    samples.mkdir(parents=True, exist_ok=True)
    images = G.generate_image(gen, PROMPTS, n=4, steps=steps, cfg=guidance, seed=0)  # prompt-major: one row per prompt
    G.image_grid([im.resize((96, 96), Image.NEAREST) for im in images], cols=4).save(samples / "grid.png")
    # Read directly, without StreamingDataset's shared memory (see megafusion/eval/rows.py).
    held_out = read_shards(DATA / "train" / "val", n=4)
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
    return gen


def evaluate(gen, run_dir: Path, steps: int, guidance: float) -> dict:
    """tools/evaluate.py shapes on the export: held-out captions drawn, held-out images
    captioned, both judged by the analyser; the table is printed and written as JSON."""
    from megafusion.eval.rows import read_shards, write_json
    from megafusion.eval.run_shapes import evaluate_shapes, format_shapes

    n = int(os.environ.get("MEGAFUSION_DEMO_EVAL_N", "64"))
    result = evaluate_shapes(gen, read_shards(DATA / "train" / "val", n), steps=steps, cfg=guidance)
    result["model"] = str(run_dir / "hf")
    out = write_json(result, run_dir / "eval_shapes.json")
    print()
    print(format_shapes(result))
    print("(generation: the share of images drawn from held-out captions with that attribute right; captioning: "
          "the share of captions of held-out images naming it; scored by megafusion/eval/shapes.py)")
    print(f"evaluation:     {out}")
    return result


LONG_STEPS = 2200
LONG_OVERRIDES = [f"train.steps={LONG_STEPS}", "log.sample_every=275", "log.sample_eval_n=64", "log.val_every=275",
                  "checkpoint.every=275", "checkpoint.keep_last=1", "run.name=demo-long",
                  f"run.dir={REPO / 'runs' / 'demo-long'}"]


USAGE = "usage: python tools/demo.py [--long] [section.field=value ...]   (make demo, make demo-long)"


def main(argv: list[str]) -> int:
    t_start = time.time()
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.strip())
        return 0
    unknown = [a for a in argv if a.startswith("-") and a != "--long"]
    if unknown:
        # Before anything is removed or launched: the trainer would only see them as
        # overrides after the previous demo run was deleted.
        print(f"error: unknown option {unknown[0]}\n{USAGE}", file=sys.stderr)
        return 2
    long = "--long" in argv
    argv = [a for a in argv if a != "--long"]
    if long:
        argv = [*LONG_OVERRIDES, *argv]
    bare = [a for a in argv if "=" not in a]
    if bare:
        # `train.steps 50` would otherwise reach the trainer (and be refused there) after
        # the previous demo run was deleted.
        print(f"error: argument {bare[0]!r} is not an override (section.field=value)\n{USAGE}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from megafusion.config import ConfigError

    try:
        cfg = demo_config(argv)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    ensure_shards(cfg.model.image_size)
    given = [a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")]
    run_dir = Path(given[-1]).expanduser().resolve() if given else REPO / "runs" / "demo"
    if run_dir.exists() and not given and not long:
        # The demo is a fresh run each time (the trainer would otherwise resume it and
        # find nothing left to do); real runs keep their directory to resume from.
        print(f"demo: removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    overrides = [f"data.train={DATA / 'train'}", f"data.val={DATA / 'train' / 'val'}", f"run.dir={run_dir}", *argv]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    sys.path.insert(0, str(REPO))
    from megafusion.parallel.launch import local_deepspeed_command

    cmd = [*local_deepspeed_command(2, str(Path(sys.executable).parent / "deepspeed")),
           str(REPO / "megafusion/train.py"),
           "--config", str(REPO / "configs/demo.yaml"), *overrides]
    print("+", " ".join(cmd), flush=True)
    t_train = time.time()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    t_train = time.time() - t_train
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
    t_eval = time.time()
    steps, guidance = cfg.log.sample_diffusion_steps, cfg.log.sample_guidance
    gen = export_and_sample(run_dir, steps, guidance)
    evaluate(gen, run_dir, steps, guidance)
    t_eval = time.time() - t_eval
    train_s = rows[-1].get("train_s")
    print(f"time:         {(time.time() - t_start) / 60:.1f} min in all: training run {t_train / 60:.1f} min "
          f"({train_s / 60 if train_s else float('nan'):.1f} min of training steps), export + samples + evaluation "
          f"{t_eval / 60:.1f} min")
    if long:
        from megafusion.eval.curve import load_curve, plot_curve

        curve = plot_curve(load_curve(run_dir, cores=os.cpu_count() or 1), run_dir / "learning_curve.png",
                           title=f"make demo-long ({os.cpu_count()} CPU cores)")
        print(f"learning curve: {curve}  (tools/learning_curve.py {run_dir} prints its points)")
    print(f"tensorboard:  .venv/bin/tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"checkpoints:  {run_dir / 'checkpoints'}")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
