"""X-Fusion's designs trained and scored side by side.

    python tools/ablate.py --tower-modes lmfusion,dual_tower,xfuse,single_tower,gated_tower \
        [--config configs/demo.yaml] [--steps N | --minutes M] [--out runs/ablate] [--n 64] \
        [--data data/synthetic/train] [--ranks 2] [--fresh] [key=value ...]

Each design (model.tower_mode) is trained on the synthetic shapes task with the same
config, data, seed and steps (the deepspeed launcher, --ranks CPU ranks), exported
(tools/convert_to_hf.py), scored with tools/evaluate.py's `shapes` (held-out captions
drawn, held-out images captioned) and `text` (logits against the base on the built-in
corpus), and its train-step cost read from its metrics. The table is printed and written
with every figure to OUT/ablation.json, the plot to OUT/ablation.png.

--steps N sets train.steps for every design (the default: the config's). --minutes M
gives each design M minutes of training wall clock instead: the run is stopped by SIGTERM
at a step boundary (the trainer checkpoints there), with the config's train.steps as the
schedule's length, and the table shows the steps each design reached. A design whose
OUT/MODE/result.json exists is not run again unless --fresh; an interrupted one resumes
from its last checkpoint. Both only under the same settings (config file and its content,
--data, --steps, --minutes, --n, --ranks, overrides; stored in result.json and, from the
start of training, OUT/MODE/ablate_settings.json): with other settings the ablation is
refused in one line before any design trains (--fresh, or another --out). single_tower
trains its text tower at the run's train.lr.
Extra key=value arguments are overrides for every design. Every design trains the
config's own recipe: the X-Fusion defaults that its designs would otherwise take
(megafusion/config.py, XFUSION_DEFAULTS) are pinned to the config's values, so the
designs differ in their layers only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megafusion.eval.ablate import (design_overrides, design_row, format_ablation, parse_modes,  # noqa: E402
                                    pinned_recipe, plot_ablation, run_cost, run_settings, settings_difference)
from megafusion.parallel.launch import local_deepspeed_command  # noqa: E402
from tools.demo import DATA, ensure_shards  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower-modes", required=True, help="comma-separated designs (model.tower_mode values)")
    p.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="train.steps for every design (default: the config's)")
    budget.add_argument("--minutes", type=float, help="training wall clock per design, instead of a step count")
    p.add_argument("--out", default=str(REPO / "runs/ablate"), help="one run directory per design beneath it")
    p.add_argument("--n", type=int, default=64, help="held-out samples scored per direction")
    p.add_argument("--data", default=None, help="synthetic training shards with their val/ split "
                   "(default: data/synthetic/train, written at the config's image size)")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks per run (the deepspeed launcher when > 1)")
    p.add_argument("--fresh", action="store_true", help="run every design again, removing its earlier run")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"unknown argument {bad[0]} (overrides are key=value)")
    for name in ("steps", "minutes", "n", "ranks"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name} {value}: must be > 0")
    try:
        args.modes = parse_modes(args.tower_modes)
    except ValueError as exc:
        p.error(str(exc))
    return args, overrides


def rank_processes(launcher: subprocess.Popen):
    """The training ranks under the launcher (what a scheduler would signal)."""
    import psutil

    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if any(a.endswith("train.py") for a in c.cmdline())
            and not any("deepspeed.launcher" in a for a in c.cmdline())] or [psutil.Process(launcher.pid)]


def train(cmd: list[str], minutes: float | None, env: dict) -> int:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    if minutes is None:
        return proc.wait()
    try:
        return proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        print(f"ablate: {minutes} min of training reached; stopping at the next step boundary", flush=True)
        for rank in rank_processes(proc):
            rank.send_signal(signal.SIGTERM)
        return proc.wait()


SETTINGS_FILE = "ablate_settings.json"  # written before training: an interrupted run's settings


def design_plan(mode: str, args, overrides: list[str], cfg, train_dir: Path) -> tuple[Path, list[str], dict]:
    """One design's run directory, trainer arguments and settings (run_settings)."""
    run_dir = Path(args.out).resolve() / mode
    run = [f"data.train={train_dir}", f"data.val={train_dir / 'val'}", f"run.dir={run_dir}", f"run.name=ablate-{mode}",
           *design_overrides(mode, cfg.train.lr), *overrides]
    if args.steps:
        run.append(f"train.steps={args.steps}")
    settings = run_settings(config=args.config, train_args=run, steps=args.steps, minutes=args.minutes, n=args.n,
                            ranks=args.ranks)
    return run_dir, run, settings


def reuse_problem(mode: str, run_dir: Path, settings: dict) -> str | None:
    """Why the design's earlier result (or interrupted run) in run_dir cannot be used with
    these settings; None when there is none or its settings are these."""
    result_file, settings_file = run_dir / "result.json", run_dir / SETTINGS_FILE
    for path, what in ((result_file, "result"), (settings_file, "interrupted run")):
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = None
            saved = data.get("settings") if isinstance(data, dict) and path == result_file else data
            diff = settings_difference(saved, settings)
            if diff is not None:
                return (f"{mode}: the {what} in {run_dir} was made with other settings ({diff}); "
                        f"--fresh trains every design again, or give another --out")
            return None
    return None


def run_design(mode: str, args, overrides: list[str], cfg, train_dir: Path) -> dict:
    from megafusion import generate as G
    from megafusion.eval.rows import read_shards
    from megafusion.eval.run_shapes import evaluate_shapes
    from megafusion.eval.text import load_corpus, text_preservation

    run_dir, run, settings = design_plan(mode, args, overrides, cfg, train_dir)
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    result_file = run_dir / "result.json"
    problem = reuse_problem(mode, run_dir, settings)  # main checked every design before the first ran
    if problem:
        raise SystemExit(f"error: {problem}")
    if result_file.exists():
        print(f"ablate: {mode}: scored already under the same settings ({result_file}; --fresh runs it again)",
              flush=True)
        return json.loads(result_file.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    entry = [str(REPO / "megafusion/train.py"), "--config", str(Path(args.config).resolve()), *run]
    if args.ranks > 1:
        cmd = [*local_deepspeed_command(args.ranks, str(Path(sys.executable).parent / "deepspeed")), *entry]
    else:
        cmd = [sys.executable, *entry]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    print(f"ablate: {mode}: training\n+ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    code = train(cmd, args.minutes, env)
    if code != 0:
        raise SystemExit(f"ablate: {mode}: training failed with exit code {code} (run directory {run_dir})")
    train_min = (time.time() - t0) / 60
    hf = run_dir / "hf"
    subprocess.run([sys.executable, str(REPO / "tools/convert_to_hf.py"), str(run_dir), str(hf), "--overwrite"],
                   check=True, cwd=REPO)
    gen = G.load(hf)
    shapes = evaluate_shapes(gen, read_shards(train_dir / "val", args.n), steps=cfg.log.sample_diffusion_steps,
                             cfg=cfg.log.sample_guidance)
    text = text_preservation(str(hf), cfg.model.base, load_corpus(None))
    row = design_row(shapes, text, run_cost(run_dir))
    row["train_minutes"] = round(train_min, 2)
    result = dict(mode=mode, row=row, shapes={k: v for k, v in shapes.items() if k != "samples"},
                  text={k: v for k, v in text.items() if k != "samples"}, run_dir=str(run_dir), settings=settings)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str]) -> int:
    from megafusion.config import ConfigError, load_config

    args, overrides = parse(argv)
    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.data:
        train_dir = Path(args.data).resolve()
        if not (train_dir / "val").is_dir():
            print(f"error: --data {args.data}: no held-out split at {train_dir / 'val'} "
                  "(tools/prepare_data.py synthetic --val-n writes it)", file=sys.stderr)
            return 2
    else:
        ensure_shards(cfg.model.image_size)
        train_dir = DATA / "train"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*pinned_recipe(cfg, overrides), *overrides]
    if not args.fresh:
        # Before any design trains: a result or interrupted run made under other settings
        # (steps, minutes, n, ranks, overrides, config, data) is not mixed into the table.
        for mode in args.modes:
            run_dir, _, settings = design_plan(mode, args, overrides, cfg, train_dir)
            problem = reuse_problem(mode, run_dir, settings)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                return 2
    results = {mode: run_design(mode, args, overrides, cfg, train_dir) for mode in args.modes}
    rows = {mode: r["row"] for mode, r in results.items()}
    (out / "ablation.json").write_text(json.dumps(dict(config=str(args.config), overrides=overrides, steps=args.steps,
                                                       minutes=args.minutes, n=args.n, designs=results), indent=2) + "\n")
    plot = plot_ablation(rows, out / "ablation.png")
    print()
    print(format_ablation(rows))
    print("(gen: the share of images drawn from held-out captions with that attribute right; cap: the share of "
          "captions of held-out images naming it; text: against the base model on the built-in corpus)")
    print(f"table and figures: {out / 'ablation.json'}\nplot:              {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
