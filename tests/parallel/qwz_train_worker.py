"""Runs the real trainer with ZeRO++'s quantized weight gathers (qwZ) on CPU ranks:
DeepSpeed's quantizer kernel is CUDA-only, so cpu_quantizer.py's stand-in takes its
place and everything else is DeepSpeed's and megafusion's own. The trainer is entered
directly, past megafusion/train.py's preflight (which refuses ZeRO++ without CUDA), by
tests/plan/plan_memory_worker.py's recorder: OUT.json gets what each rank held and sent
(with the DeepSpeed JSON's comms_logger on) and "quantized": [calls, elements] of the
stand-in kernel.

    qwz_train_worker.py CONFIG.yaml OUT.json [section.key=value ...]
    -> also `QWZ_QUANTIZED <calls> <elements>` per rank on stdout"""
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS / "parallel"))
sys.path.insert(0, str(TESTS / "plan"))

from cpu_quantizer import install  # noqa: E402
from plan_memory_worker import record  # noqa: E402


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    kernel = install()
    try:
        record(args[0], Path(args[1]), args[2:], extra={"quantized": lambda: [kernel.calls, kernel.elements]})
    finally:
        # One write: the ranks share torchrun's stdout, and print's separate newline lets
        # the other rank's line land in the middle of this one.
        sys.stdout.write(f"QWZ_QUANTIZED {kernel.calls} {kernel.elements}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
