"""Per-rank bytes of parameters, gradients and optimiser state as DeepSpeed holds them,
beside the ZeRO-3 theory (2 x frozen + 16 x trainable) / world size (bf16 weights with
fp32 master weights and Adam's two moments; gradients in bf16)."""
from __future__ import annotations

import torch


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    frozen = trainable = 0
    for p in module.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


def held_bytes(engine, extra_grads: torch.Tensor | None = None) -> dict:
    """What this rank actually holds (after the first optimiser step, when Adam's state
    exists). extra_grads: a gradient buffer the trainer keeps outside DeepSpeed's optimiser
    (stage 0's flat buffer; the parameters' .grad views of it are None between steps)."""
    params = 0
    for p in engine.module.parameters():
        params += _bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p.data)
    opt = engine.optimizer
    master = 0
    # ZeRO-3, ZeRO-1/2, and BF16_Optimizer (bf16 with fp32 gradient accumulation at ZeRO-1,
    # the pipeline's optimizer).
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        for t in getattr(opt, name, None) or []:
            master += _bytes(t)
    grads = 0
    for name in ("grad_partitions_flat_buffer",):
        grads += _bytes(getattr(opt, name, None))
    # BF16_Optimizer: an fp32 accumulation buffer for all of this rank's trainable
    # parameters (not partitioned), plus the bf16 param.grad, which lives from the first
    # backward of a step to the end of the step (None when this runs after a step).
    for t in getattr(opt, "fp32_groups_gradients_flat", None) or []:
        grads += _bytes(t)
    for group in getattr(opt, "bf16_groups", None) or []:
        grads += sum(_bytes(p.grad) for p in group)
    if not grads:
        for t in getattr(opt, "averaged_gradients", {}).values() if isinstance(getattr(opt, "averaged_gradients", None), dict) else []:
            grads += sum(_bytes(g) for g in t) if isinstance(t, list) else _bytes(t)
    if extra_grads is not None:  # stage 0's flat buffer (parallel.flat_gradients), alive between steps
        grads += _bytes(extra_grads)
    inner = getattr(opt, "optimizer", opt)
    state = 0
    for s in getattr(inner, "state", {}).values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                state += _bytes(v)
    return {"params": params, "grads": grads, "master": master, "optimizer_state": state}


def zero3_theory(frozen: int, trainable: int, world_size: int) -> float:
    return (2 * frozen + 16 * trainable) / world_size


def report(engine, world_size: int, extra_grads: torch.Tensor | None = None) -> str:
    frozen, trainable = parameter_counts(engine.module)
    held = held_bytes(engine, extra_grads)
    gib = lambda b: f"{b / 2**20:,.1f} MiB"
    total = sum(held.values())
    lines = [
        f"parameters: {frozen:,} frozen, {trainable:,} trainable",
        "this rank holds: " + ", ".join(f"{k} {gib(v)}" for k, v in held.items()) + f" (total {gib(total)})",
    ]
    if engine.zero_optimization_stage() == 3:  # the formula is ZeRO-3's; other stages replicate
        lines.append(f"ZeRO-3 theory for bf16 + fp32 master: (2 x frozen + 16 x trainable) / {world_size} = "
                     f"{gib(zero3_theory(frozen, trainable, world_size))}")
    return "\n".join(lines)
