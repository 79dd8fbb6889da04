"""Runs the real trainer with ZeRO++'s quantized weight gathers (qwZ) on CPU ranks:
DeepSpeed's quantizer kernel is CUDA-only, so cpu_quantizer.py's stand-in takes its
place and everything else is DeepSpeed's and megafusion's own. The trainer is entered
directly, past megafusion/train.py's preflight (which refuses ZeRO++ without CUDA).

    qwz_train_worker.py CONFIG.yaml [section.key=value ...]
    -> `QWZ_QUANTIZED <calls> <elements>` per rank; exit code = the run's"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_quantizer import install  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.trainer import Trainer  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    kernel = install()
    code = Trainer(load_config(args[0], args[1:])).run()
    # One write: the ranks share torchrun's stdout, and print's separate newline lets the
    # other rank's line land in the middle of this one.
    sys.stdout.write(f"QWZ_QUANTIZED {kernel.calls} {kernel.elements}\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
