"""Plot a run's learning curve on the synthetic shapes task.

    python tools/learning_curve.py RUN_DIR [--out FILE.png] [--cores N] [--title T] [--json]

Reads RUN_DIR/shapes_eval.jsonl (written at each sample point when log.sample_eval_n > 0;
`make demo-long` sets it) and RUN_DIR/metrics.jsonl, and draws shapes accuracy of both
directions against CPU-minutes of training steps (their wall clock times --cores, by
default this machine's core count). Prints the points as a table (or JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafusion.eval.curve import CURVE_ATTRIBUTES, CurveError, load_curve, plot_curve  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/learning_curve.py", description=__doc__.split("\n")[1])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/learning_curve.png)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the run used (default: this machine's)")
    p.add_argument("--title", default="")
    p.add_argument("--json", action="store_true", help="print the points as JSON")
    args = p.parse_args(argv)
    try:
        points = load_curve(args.run_dir, args.cores)
    except (CurveError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    out = plot_curve(points, args.out or Path(args.run_dir) / "learning_curve.png", title=args.title)
    if args.json:
        print(json.dumps(points, indent=1))
    else:
        keys = [(d, k) for d in ("generation", "captioning") for k in CURVE_ATTRIBUTES]
        print("step  cpu-min  " + "  ".join(f"{d[:3]}.{k}" for d, k in keys))
        for pt in points:
            cells = "  ".join(f"{pt[d].get(k, float('nan')):>{len(d[:3]) + 1 + len(k)}.2f}" for d, k in keys)
            print(f"{pt['step']:>4}  {pt['cpu_minutes']:>7.1f}  {cells}")
    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
