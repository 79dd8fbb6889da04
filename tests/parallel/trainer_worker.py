"""Runs the real trainer in this process (one rank, or one of several under a launcher)
and then reports what sits inside its DeepSpeed engine:

    python trainer_worker.py CONFIG.yaml [section.key=value ...]
    -> `ENGINE_OPTIMIZER <module>.<class> wrapped_by <module>.<class>` on rank 0, exit code = the run's

The client optimizer is what ZeRO's wrapper steps (engine.optimizer.optimizer)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.trainer import Trainer  # noqa: E402


def qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    trainer = Trainer(load_config(args[0], args[1:]))
    code = trainer.run()
    wrapper = trainer.engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    if trainer.rank == 0:
        print(f"ENGINE_OPTIMIZER {qualname(inner)} wrapped_by {qualname(wrapper)}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
