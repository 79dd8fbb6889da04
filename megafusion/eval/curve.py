"""The learning curve of a run on the synthetic shapes task: shapes accuracy (from
<run.dir>/shapes_eval.jsonl, written at each sample point when log.sample_eval_n > 0)
against the CPU time spent training (from <run.dir>/metrics.jsonl's step_s: the wall
clock of the training steps alone, without sampling, validation and checkpoints, times the
cores the run used).

    points = load_curve("runs/demo-long", cores=2)
    plot_curve(points, "docs/demo_long_curve.png", title="make demo-long")

A resumed run appends to both files; the last record of a step wins, so a step that was
redone after a crash counts once.
"""
from __future__ import annotations

import json
from pathlib import Path

# Attributes drawn, per direction: the goals are on colour and shape.
CURVE_ATTRIBUTES = ("colour", "shape", "position")


class CurveError(ValueError):
    """A run directory without what the curve needs (one line)."""


def _last_per_step(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            row = json.loads(line)
            rows[int(row["step"])] = row
    return rows


def load_curve(run_dir: str | Path, cores: int) -> list[dict]:
    """One point per evaluated step: step, cpu_minutes (training steps up to and
    including it, times `cores`), and {direction: {attribute: accuracy}}."""
    run = Path(run_dir)
    evals, metrics = run / "shapes_eval.jsonl", run / "metrics.jsonl"
    for f, what in ((evals, "log.sample_eval_n > 0 writes it at each sample point"), (metrics, "the trainer writes it")):
        if not f.is_file():
            raise CurveError(f"{run_dir}: no {f.name} ({what})")
    if cores < 1:
        raise CurveError(f"--cores {cores}: must be >= 1")
    steps = _last_per_step(metrics)
    if any("step_s" not in r for r in steps.values()):
        raise CurveError(f"{metrics}: rows without step_s (written by an older trainer)")
    elapsed, total = {}, 0.0
    for step in sorted(steps):
        total += float(steps[step]["step_s"])
        elapsed[step] = total
    points = []
    for step, row in sorted(_last_per_step(evals).items()):
        if step not in elapsed:
            raise CurveError(f"{evals}: step {step} has no row in metrics.jsonl")
        acc = {d: {k: v["accuracy"] for k, v in (row.get(d) or {}).items()} for d in ("generation", "captioning")}
        points.append(dict(step=step, cpu_minutes=elapsed[step] * cores / 60.0, n=row.get("n"), **acc))
    if not points:
        raise CurveError(f"{evals}: no evaluations")
    return points


def plot_curve(points: list[dict], out: str | Path, title: str = "", chance: dict | None = None) -> Path:
    """Accuracy against CPU-minutes, one line per direction and attribute, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megafusion.eval.shapes import CHANCE

    chance = CHANCE if chance is None else chance
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = [p["cpu_minutes"] for p in points]
    colours = dict(colour="tab:red", shape="tab:blue", position="tab:green")
    for direction, style in (("generation", "-o"), ("captioning", "--s")):
        for key in CURVE_ATTRIBUTES:
            y = [p[direction].get(key) for p in points]
            if any(v is not None for v in y):
                ax.plot(x, [float("nan") if v is None else v for v in y], style, color=colours[key],
                        label=f"{direction} {key}", markersize=4)
    for key in CURVE_ATTRIBUTES:
        ax.axhline(chance[key], color=colours[key], linestyle=":", linewidth=0.8)
    ax.set_xlabel("CPU-minutes of training steps")
    ax.set_ylabel(f"accuracy (held-out, n={points[-1].get('n')}); dotted: chance")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
