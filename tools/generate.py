"""Sample from a megafusion model (see megafusion/generate.py).

    python tools/generate.py --model OUT_DIR image --prompt TEXT [--steps N] [--cfg S] [--seed N] [--n K] --out FILE.png
    python tools/generate.py --model OUT_DIR caption --image FILE [--max-new-tokens N]
    python tools/generate.py --model OUT_DIR text --prompt TEXT
    python tools/generate.py --model OUT_DIR interleave --prompt TEXT --out FILE.md

OUT_DIR is a directory written by tools/convert_to_hf.py, or a run / checkpoint directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafusion.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
