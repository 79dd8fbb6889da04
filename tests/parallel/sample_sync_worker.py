"""Run under `deepspeed --num_gpus 2`: the real trainer with rank 0's sample point made
slow (SLOW seconds of sleep, standing in for log.sample_eval_n's evaluation), recording
on each rank when its sampling ended and when its validation began; written as JSON to
<out>/rank<R>.json. Usage: sample_sync_worker.py CONFIG OUT_DIR SLOW [overrides...]"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, out_dir, slow, overrides = args[0], Path(args[1]), float(args[2]), args[3:]

    import torch.distributed as dist

    from megafusion.config import load_config
    from megafusion.parallel import sampling
    from megafusion.parallel.trainer import Trainer

    events = []
    real_call = sampling.TrainingSampler.__call__

    def slow_call(self, step, writer=None):
        result = real_call(self, step, writer)
        if self.rank == 0:
            time.sleep(slow)
        events.append(("sampled", step, time.time()))
        return result

    sampling.TrainingSampler.__call__ = slow_call
    real_validate = Trainer._validate

    def recording_validate(self, step, writer):
        events.append(("validating", step, time.time()))
        return real_validate(self, step, writer)

    Trainer._validate = recording_validate
    trainer = Trainer(load_config(config, overrides))
    assert trainer.run() == 0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(events))


if __name__ == "__main__":
    main()
