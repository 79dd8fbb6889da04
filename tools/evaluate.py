"""Quality metrics of a megafusion model (see megafusion/eval/cli.py and README "Evaluation").

    python tools/evaluate.py shapes --model DIR [--data data/synthetic/train/val] [--n 64] [--steps S] [--cfg G] [--out FILE.json]
    python tools/evaluate.py text --model DIR --base BASE [--corpus FILE.jsonl] [--out FILE.json]
    python tools/evaluate.py fid --real SHARDS|DIR (--fake SHARDS|DIR | --model DIR) --inception-weights FILE
    python tools/evaluate.py clip (--model DIR | --images SHARDS|DIR) [--data SHARDS | --captions FILE.jsonl] --clip-model DIR
    python tools/evaluate.py cider (--model DIR --data SHARDS | --captions FILE.jsonl)

Every command prints a table, writes every number as JSON with --out, and shows progress
on stderr; a bad input is a one-line error and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafusion.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
