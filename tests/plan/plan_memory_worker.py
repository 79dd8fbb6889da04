"""Run under `deepspeed --num_gpus 2`: the real trainer for its configured steps, then, on
rank 0, what DeepSpeed holds (megafusion.parallel.memory.held_bytes) and the bytes of
every collective DeepSpeed's comms logger saw, in all ("collectives") and as it stood
after each train step ("after_step", so that a step's own traffic is a difference with
start-up cancelled), written as JSON to OUT.

    plan_memory_worker.py CONFIG OUT.json [overrides...]

The DeepSpeed JSON the overrides name must enable "comms_logger" (prof_all) for the
collectives to be recorded."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, out, overrides = args[0], Path(args[1]), args[2:]

    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm

    from megafusion.config import load_config
    from megafusion.parallel.memory import held_bytes
    from megafusion.parallel.trainer import Trainer

    def counts() -> dict:
        return {name: {str(size): rec[0] for size, rec in sizes.items()}
                for name, sizes in ds_comm.comms_logger.comms_dict.items()}

    after_step = []
    zero_step = Trainer._zero_step

    def counted_step(self, *a, **kw):
        result = zero_step(self, *a, **kw)
        after_step.append(counts())
        return result

    Trainer._zero_step = counted_step
    trainer = Trainer(load_config(config, overrides))
    assert trainer.run() == 0
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"held_bytes": held_bytes(trainer.engine), "collectives": counts(),
                                   "after_step": after_step, "optimizer": type(trainer.engine.optimizer).__name__},
                                  indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
