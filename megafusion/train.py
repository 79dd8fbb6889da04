"""Train LMFusion on DeepSpeed.

    deepspeed [--num_gpus N] megafusion/train.py --config configs/X.yaml [section.field=value ...]
    torchrun --nproc_per_node N megafusion/train.py --config ...
    srun ... python megafusion/train.py --config ...        (see slurm/)

A rerun with the same run.dir resumes from the newest complete checkpoint. SIGUSR1 or
SIGTERM makes every rank checkpoint at the next step boundary and exit 0 (Slurm then
requeues; before the first step there is nothing to save and it just exits 0); a second
signal exits at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `import megafusion` work
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megafusion.config import ConfigError, load_config  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megafusion/train.py", description=__doc__.split("\n")[1])
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.field=value")
    return p.parse_args(argv)


def fail(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0])

    from megafusion.parallel.preflight import preflight

    preflight(cfg)  # one-line errors before any process group or model exists

    # DeepSpeed 0.19 calls torch.distributed APIs that torch 2.14 deprecates, once per
    # rank and step kind: nothing a user can act on, and it buries the progress bar.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")

    from megafusion.parallel.trainer import SetupError, Trainer

    try:
        return Trainer(cfg).run()
    except (SetupError, ConfigError) as exc:  # bad input found during setup: one line, no traceback
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


if __name__ == "__main__":
    sys.exit(main())
