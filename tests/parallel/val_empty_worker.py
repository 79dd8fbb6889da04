"""One of two ranks started by test_validation.py (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment): the real trainer, with data.val made to yield no batch
on rank 1 alone (every sample dropped there, or fewer samples than ranks).

    python val_empty_worker.py CONFIG.yaml [section.key=value ...]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megafusion.config import load_config  # noqa: E402
from megafusion.data import loader  # noqa: E402
from megafusion.parallel.trainer import Trainer  # noqa: E402


class DropsEverything:
    """Reads the real loader through (streaming's ranks of a node iterate together) and
    yields none of its batches, as a rank whose samples all overflow would."""

    def __init__(self, real):
        self.real = real

    def __iter__(self):
        for _ in self.real:
            pass
        yield from ()


def main():
    real = loader.build_val_loader
    if os.environ["RANK"] == "1":
        loader.build_val_loader = lambda *args, **kwargs: DropsEverything(real(*args, **kwargs))
    return Trainer(load_config(sys.argv[1], sys.argv[2:])).run()


if __name__ == "__main__":
    sys.exit(main())
