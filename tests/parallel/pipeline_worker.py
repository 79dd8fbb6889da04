"""Run under `deepspeed --num_gpus 2`: the real trainer on two pipeline stages (ZeRO-1),
then, on every rank, an inventory of what the rank holds, written as JSON to
<out>/rank<R>.json. Usage: pipeline_worker.py CONFIG OUT_DIR [overrides...]

Recorded: the decoder layers this rank's stage modules are, which skeleton parameters
have real storage, parameter bytes and dtypes, the base tensors read from disk, and how
often a whole base model was loaded (it must be never)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, out_dir, overrides = args[0], Path(args[1]), args[2:]

    import transformers

    from megafusion.config import load_config
    from megafusion.parallel import base_weights
    from megafusion.parallel.memory import held_bytes, parameter_counts
    from megafusion.parallel.pipeline import DecoderStage
    from megafusion.parallel.trainer import Trainer

    whole_loads = []
    real_from_pretrained = transformers.LlamaForCausalLM.from_pretrained.__func__

    def counting_from_pretrained(cls, *a, **k):
        whole_loads.append(str(a[0]) if a else "")
        return real_from_pretrained(cls, *a, **k)

    transformers.LlamaForCausalLM.from_pretrained = classmethod(counting_from_pretrained)
    reads = []
    real_get = base_weights.BaseWeights.get

    def recording_get(self, name):
        reads.append(self.key_for(name))
        return real_get(self, name)

    base_weights.BaseWeights.get = recording_get

    drawn, logged = _record_throughput(Trainer)
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    code = trainer.run()
    assert code == 0, code

    import torch.distributed as dist

    module, skeleton = trainer.engine.module, trainer.model
    owned = sorted(i for m in module.modules() if isinstance(m, DecoderStage)
                   for i, layer in enumerate(skeleton.layers) if m.layer is layer)
    real = sorted({n.split(".")[1] for n, p in skeleton.named_parameters() if n.startswith("layers.") and not p.is_meta})
    held = {n: p for n, p in module.named_parameters()}
    result = {
        "rank": dist.get_rank(),
        "stage": trainer.engine.stage_id,
        "decoder_layers": owned,
        "skeleton_layers_with_storage": [int(i) for i in real],
        "module_children": sorted(type(m).__name__ for m in module.children()),
        "parameter_names": sorted(held),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in held.values()),
        "parameter_dtypes": sorted({str(p.dtype) for p in held.values()}),
        "fused_model_parameters": sum(p.numel() for p in skeleton.parameters()),
        "base_tensors_read": sorted(set(reads)),
        "whole_base_loads": whole_loads,
        "non_meta_skeleton_tensors": sum(not p.is_meta for p in skeleton.parameters()),
        "optimizer": type(trainer.engine.optimizer).__name__,
        "held_bytes": held_bytes(trainer.engine),
        "frozen_trainable": parameter_counts(module),
        "data_parallel": trainer.world // cfg.parallel.pipeline_stages,
        "batches_drawn": drawn,
        "scalars_logged": logged,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    print(f"PIPELINE_WORKER_OK rank {result['rank']}", flush=True)


def _record_throughput(Trainer):
    """What the trainer's throughput scalars must count, recorded beside what it logs.
    The step log's clock (megafusion.parallel.step_log.time.time) is replaced by one that
    advances exactly one second per training step, so a logged rate times log.every is
    the amount the trainer counted over those steps. Recorded per batch this rank drew:
    its real tokens (the packer's count) and its model FLOPs (StepLog.batch_flops,
    checked against torch's FlopCounterMode in tests/test_flops.py); logged: what reaches
    tensorboard's writer (FLOP/s from the MFU scalar: MFU x peak x world)."""
    import time as real_time

    from megafusion.parallel import step_log

    class StepClock:
        now = 1.0e9

        def time(self):
            return self.now

        def __getattr__(self, name):
            return getattr(real_time, name)

    clock = StepClock()
    step_log.time = clock
    drawn, logged, step_of_batch, last_flops = [], [], [1], [0.0]
    real_next, real_flops = Trainer._next_batch, step_log.StepLog.batch_flops
    real_step, real_init = Trainer._pipeline_step, step_log.StepLog.__init__

    def next_batch(self):
        batch = real_next(self)
        stats = getattr(batch, "stats", None) or {}
        drawn.append({"step": step_of_batch[0], "tokens": int(stats["tokens"]), "flops": last_flops[0]})
        return batch

    def batch_flops(self, batch):
        last_flops[0] = real_flops(self, batch)
        return last_flops[0]

    def pipeline_step(self):
        out = real_step(self)
        clock.now += 1.0
        step_of_batch[0] += 1
        return out

    def init(self, cfg, *args, **kwargs):
        real_init(self, cfg, *args, **kwargs)
        if self.writer is None:
            return
        real_add = self.writer.add_scalar

        def add_scalar(tag, value, step, *a, **kw):
            if tag == "throughput/tokens_per_s":
                logged.append({"step": step, "tokens_per_s": value})
            elif tag == "throughput/mfu":
                logged[-1]["flops_per_s"] = value * cfg.log.peak_flops_per_device * self.world
            return real_add(tag, value, step, *a, **kw)

        self.writer.add_scalar = add_scalar

    Trainer._next_batch, step_log.StepLog.batch_flops = next_batch, batch_flops
    Trainer._pipeline_step, step_log.StepLog.__init__ = pipeline_step, init
    return drawn, logged


if __name__ == "__main__":
    main()
