"""The pieces of tools/ablate.py that do not launch anything: what each decoder-layer
design (model.tower_mode) changes in a run config, what a finished run cost, and the
table and plot that compare the designs.

X-Fusion's Table 1 (Llama-3.2-1B, ../shared/PAPERS.md) is the reference ordering: Dual
Tower best on generation (FID 14.20, against 20.22 for Dual Projection, our lmfusion),
Single Tower losing text ability (MMLU 25.0 against 32.2), Gated Tower worst on FID.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from megafusion.model.config import TOWER_MODES

# Columns of the comparison: (key in a design's result, header).
COLUMNS = [
    ("steps", "steps"),
    ("step_s", "s/step (median)"),
    ("generation/colour", "gen colour"),
    ("generation/shape", "gen shape"),
    ("captioning/colour", "cap colour"),
    ("captioning/shape", "cap shape"),
    ("max_abs_logit_diff", "text max|dlogit|"),
    ("perplexity_ratio", "text ppl / base"),
]


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in TOWER_MODES]
    if not modes or bad:
        raise ValueError(f"--tower-modes {text}: expected a comma-separated list of {', '.join(TOWER_MODES)}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"--tower-modes {text}: a design is named twice")
    return modes


def design_overrides(mode: str, lr: float) -> list[str]:
    """Run-config overrides for one design. single_tower trains every weight, so its text
    tower needs a learning rate: the run's own (the one the image tower gets elsewhere)."""
    out = [f"model.tower_mode={mode}"]
    if mode == "single_tower":
        out += ["model.train_text_tower=true", f"train.text_lr={lr}"]
    return out


def pinned_recipe(cfg, overrides: list[str]) -> list[str]:
    """Overrides that keep the config's own values of the keys X-Fusion's designs would
    otherwise take from X-Fusion's recipe (megafusion/config.py, XFUSION_DEFAULTS), except
    those the caller's overrides set: every design then trains the same recipe."""
    from megafusion.config import XFUSION_DEFAULTS

    given = {o.split("=", 1)[0].strip() for o in overrides}
    out = []
    for key in XFUSION_DEFAULTS:
        if key not in given:
            section, name = key.split(".")
            out.append(f"{key}={getattr(getattr(cfg, section), name)}")
    return out


def run_settings(*, config: str | Path, train_args: list[str], steps: int | None, minutes: float | None, n: int,
                 ranks: int) -> dict:
    """Everything a design's result depends on: the config file (path and content), the
    trainer's arguments (data, overrides, steps), the training budget, the ranks and the
    number of held-out samples scored. tools/ablate.py stores it with each result and
    reuses a result only under identical settings."""
    import hashlib

    path = Path(config).resolve()
    return dict(config=str(path), config_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                train_args=[str(a) for a in train_args], steps=steps, minutes=minutes, n=n, ranks=ranks)


def settings_difference(saved: dict | None, now: dict) -> str | None:
    """None when `saved` (a stored result's settings) equals `now`; else what differs, in
    a few words (saved -> now)."""
    if not isinstance(saved, dict):
        return "its settings were not recorded"
    keys = [k for k in now if saved.get(k) != now[k]] + [k for k in saved if k not in now]
    if not keys:
        return None
    parts = []
    for k in keys:
        if k == "train_args":
            old, new = saved.get(k) or [], now[k]
            changed = [a for a in new if a not in old] + [f"not {a}" for a in old if a not in new]
            parts.append("trainer arguments " + (", ".join(changed[:3]) if changed else "reordered"))
        elif k == "config_sha256":
            parts.append("the config file's content")
        else:
            parts.append(f"{k} {saved.get(k)} -> {now.get(k)}")
    return "; ".join(parts)


def run_cost(run_dir: Path, skip: int = 3) -> dict:
    """Steps reached and the median wall clock of a training step (the first `skip` steps,
    which include warm-up work, left out) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {r["step"]: r for r in rows}  # a resumed run appends the steps it redoes
    times = [r["step_s"] for s, r in sorted(last.items()) if s > skip and r.get("step_s") is not None]
    times = times or [r["step_s"] for r in last.values() if r.get("step_s") is not None]
    return dict(steps=max(last) if last else 0, step_s=statistics.median(times) if times else None)


def design_row(shapes: dict | None, text: dict | None, cost: dict) -> dict:
    """One design's figures, flat: cost, shapes accuracies, text preservation."""
    row = dict(cost)
    for direction in ("generation", "captioning"):
        for attribute, v in ((shapes or {}).get(direction) or {}).items():
            row[f"{direction}/{attribute}"] = v["accuracy"]
    if text:
        row["max_abs_logit_diff"] = text["max_abs_logit_diff"]
        row["perplexity_ratio"] = text["perplexity_ratio"]
    return row


def format_ablation(results: dict[str, dict]) -> str:
    from megafusion.eval.rows import table

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2e}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else v

    rows = [[mode] + [cell(r.get(key)) for key, _ in COLUMNS] for mode, r in results.items()]
    base = results.get("lmfusion", {}).get("step_s")
    if base:
        for row, r in zip(rows, results.values()):
            row[2] = f"{r['step_s']:.2f} ({r['step_s'] / base:.2f}x)" if r.get("step_s") else "-"
    return table(rows, ["design"] + [h for _, h in COLUMNS])


def plot_ablation(results: dict[str, dict], out: Path) -> Path:
    """Grouped bars: generation and captioning accuracy (colour, shape) per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["generation/colour", "generation/shape", "captioning/colour", "captioning/shape"]
    modes = list(results)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(modes), 3.6))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(modes))]
        ax.bar(xs, [results[m].get(key) or 0.0 for m in modes], width, label=key.replace("/", " "))
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (held-out)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("decoder-layer designs, same data, steps and seed")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
