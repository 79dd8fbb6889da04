"""Run under a launcher of N local ranks: the real trainer for its configured steps, then
what DeepSpeed holds on the rank (megafusion.parallel.memory.held_bytes), the bytes of
every collective DeepSpeed's comms logger saw there, in all ("collectives") and as it
stood after each train step ("after_step", so that a step's own traffic is a difference
with start-up cancelled), each step's micro-batches ("batches": tokens and images) and,
under ZeRO-3, the most parameter elements each step held gathered at once
("peak_gathered": the coordinator's own count, whose prefetch stage3_max_live_parameters
bounds) and, under ZeRO-1/2, the bytes of the reduced gradient partition as each
optimizer step began ("grads_at_step"); the bytes this rank put into all-gathers, by
the size of the group they ran over, as they stood after each step ("gathers_by_group":
ZeRO++ hpZ gathers inside a node's group, plain ZeRO-3 over all ranks); and the bytes of
hpZ's secondary shards as each step ended, before DeepSpeed drops the trainable ones
("secondary_at_step"), as JSON: rank 0's to OUT, rank R's to OUT.rankR.json (a pipeline stage's
traffic is its own).

    plan_memory_worker.py CONFIG OUT.json [overrides...]

The DeepSpeed JSON the overrides name must enable "comms_logger" (prof_all) for the
collectives to be recorded."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    record(args[0], Path(args[1]), args[2:])


def record(config: str, out: Path, overrides: list[str], extra: dict | None = None) -> None:
    """Run the trainer and write what it held and sent (the module docstring); extra:
    more keys for the JSON (e.g. a stand-in kernel's counts), read after the run."""
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm

    from megafusion.config import load_config
    from megafusion.parallel.memory import held_bytes
    from megafusion.parallel.trainer import Trainer

    def counts() -> dict:
        return {name: {str(size): rec[0] for size, rec in sizes.items()}
                for name, sizes in ds_comm.comms_logger.comms_dict.items()}

    after_step, batches, peak_gathered = [], [], []
    # All-gathers by group size: the comms logger keys them by message size alone.
    # DeepSpeed's allgather_fn looks all_gather_into_tensor up in its module at each call.
    by_group, gathers_by_group = {}, []
    gather = ds_comm.all_gather_into_tensor

    def counted_gather(output_tensor, tensor, group=None, *a, **kw):
        size = str(dist.get_world_size(group))
        by_group[size] = by_group.get(size, 0) + tensor.numel() * tensor.element_size()
        return gather(output_tensor, tensor, group, *a, **kw)

    ds_comm.all_gather_into_tensor = counted_gather

    def counted(step):
        def counted_step(self, *a, **kw):
            batches.append([])
            peak_gathered.append(0)
            result = step(self, *a, **kw)
            after_step.append(counts())
            gathers_by_group.append(dict(by_group))
            return result
        return counted_step

    def recorded(next_batch):
        def recorded_batch(self):
            b = next_batch(self)
            batches[-1].append({"tokens": b.input_ids.numel(), "images": int(b.images.shape[0])})
            return b
        return recorded_batch

    # The coordinator counts the elements it has gathered and not yet released; after
    # each fetch (a module's own weights, then the prefetch) that count is at a local peak.
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    fetch = Coordinator.fetch_sub_module

    def counted_fetch(self, *a, **kw):
        result = fetch(self, *a, **kw)
        if peak_gathered:
            peak_gathered[-1] = max(peak_gathered[-1], self._PartitionedParameterCoordinator__n_available_params)
        return result

    Coordinator.fetch_sub_module = counted_fetch
    # ZeRO-1/2 reduce a step's gradients into one buffer and hand the optimizer step
    # this rank's partition of it (averaged_gradients, views of the buffer), which the
    # step frees: the bytes of the storage those views keep alive as the step begins.
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero2_step, grads_at_step = DeepSpeedZeroOptimizer.step, []

    def measured_step(self, *a, **kw):
        storages = {}
        for grads in (self.averaged_gradients or {}).values():
            for g in grads or []:
                storages[g.untyped_storage().data_ptr()] = g.untyped_storage().nbytes()
        grads_at_step.append(sum(storages.values()))
        return zero2_step(self, *a, **kw)

    DeepSpeedZeroOptimizer.step = measured_step
    # hpZ: each step ends by dropping the trainable parameters' secondary shards (their
    # values change); the frozen ones stay. What was held just before.
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Zero3

    invalidate, secondary_at_step = Zero3.invalidate_secondary_tensor, []

    def measured_invalidate(self):
        secondary = [getattr(p, "ds_secondary_tensor", None) for p in self.module.parameters()]
        secondary_at_step.append(sum(t.numel() * t.element_size() for t in secondary if t is not None))
        return invalidate(self)

    Zero3.invalidate_secondary_tensor = measured_invalidate
    Trainer._zero_step = counted(Trainer._zero_step)
    Trainer._pipeline_step = counted(Trainer._pipeline_step)
    Trainer._next_batch = recorded(Trainer._next_batch)
    trainer = Trainer(load_config(config, overrides))
    assert trainer.run() == 0
    rank = dist.get_rank()
    mine = out if rank == 0 else out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    mine.write_text(json.dumps({"held_bytes": held_bytes(trainer.engine), "collectives": counts(),
                                "after_step": after_step, "batches": batches,
                                "peak_gathered": peak_gathered, "grads_at_step": grads_at_step,
                                "gathers_by_group": gathers_by_group, "secondary_at_step": secondary_at_step,
                                "optimizer": type(trainer.engine.optimizer).__name__,
                                **{k: v() if callable(v) else v for k, v in (extra or {}).items()}}, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
