"""The planner at start-up: does the configured setting fit the GPUs this run has?

A 70B run spends minutes loading its base before the first step shows that a micro-batch
is too large. Before any of that, rank 0 asks the planner for the configured setting's
memory per GPU (the rank that needs most) at this world size, against the device's own
memory less the planner's reserve for the CUDA context, NCCL and fragmentation, and
warns when it does not fit. A warning, not a refusal: the figure is an estimate (model
states within 10% of what DeepSpeed holds, activations against what autograd saves:
tests/plan), and a run a little past it may still run.
"""
from __future__ import annotations

import dataclasses


def device_memory_bytes(device) -> float | None:
    """A CUDA device's total memory; None for any other device (a CPU run's limit is the
    host's memory, which the planner does not model)."""
    import torch

    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def memory_warning(cfg, world: int, gpus_per_node: int, device_bytes: float | None) -> str | None:
    """One line when the planner expects the configured setting to need more memory per
    GPU than `device_bytes` offers; None when it fits, off CUDA, or when the planner
    cannot plan this run (the run's own checks report a bad model or config in their
    words; advice must not stop a run)."""
    if device_bytes is None:
        return None
    from megafusion.plan.choose import CAPTION_TOKENS, EFFICIENCY, configured_setting, evaluate
    from megafusion.plan.hardware import RESERVE, gpu
    from megafusion.plan.shapes import model_shape

    # Memory is all the estimate takes from the GPU; the rest of its figures are unused.
    this_gpu = dataclasses.replace(gpu("h100-80gb"), name="this GPU", memory=device_bytes)
    try:
        setting = configured_setting(cfg, world)
        est = evaluate(model_shape(cfg), setting, world, gpus_per_node, this_gpu, seq_len=cfg.data.seq_len,
                       caption_tokens=CAPTION_TOKENS, efficiency=EFFICIENCY, frozen_text=not cfg.model.train_text_tower)
    except Exception:  # noqa: BLE001 (see the docstring)
        return None
    if est.fits:
        return None
    nodes = max(1, world // gpus_per_node)
    return (f"warning: tools/plan.py estimates {est.memory['total'] / 1e9:.1f} GB per GPU for this setting "
            f"({setting.name}, micro-batch {setting.micro_batch} x {setting.grad_accum} accumulated, {world} GPUs) "
            f"where each GPU offers {this_gpu.usable / 1e9:.1f} GB ({device_bytes / 1e9:.1f} GB less "
            f"{RESERVE / 1e9:.0f} GB for CUDA, NCCL and fragmentation): the first steps may run out of memory. "
            f"python tools/plan.py --config CONFIG --nodes {nodes} names settings that fit")
