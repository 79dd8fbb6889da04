"""The DeepSpeed engine around the fused model: parameter groups, optimiser, schedule.

Frozen parameters never enter an optimiser group, so under ZeRO-3 they stay 16-bit
partitions with no gradient, no fp32 master copy and no Adam state. The optimiser is a
plain torch AdamW created here (DeepSpeed wraps it): this keeps its settings in the run
config and avoids compiling FusedAdam on machines without CUDA.
"""
from __future__ import annotations

import torch

from megafusion.config import RunConfig, lr_multiplier


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    text_ids = set()
    if hasattr(model, "text_tower_parameter_names"):
        names = model.text_tower_parameter_names()
        text_ids = {id(p) for n, p in model.named_parameters() if n in names}
    groups = {("image", True): [], ("image", False): [], ("text", True): [], ("text", False): []}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = "text" if id(p) in text_ids else "image"
        decay = p.dim() >= 2  # no weight decay on norms, biases, single embeddings rows
        groups[(tower, decay)].append(p)
    t = cfg.train
    out = []
    for (tower, decay), params in groups.items():
        if params:
            out.append({
                "params": params,
                "lr": t.lr if tower == "image" else t.text_lr,
                "weight_decay": t.weight_decay if decay else 0.0,
                "name": f"{tower}{'' if decay else '_no_decay'}",
            })
    if not out:
        raise SystemExit("error: the model has no trainable parameters")
    return out


def build_optimizer(groups: list[dict], cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    # foreach=False: DeepSpeed's ZeRO swaps the groups' params for flat fp32 partitions.
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, foreach=False)


def build_scheduler(cfg: RunConfig):
    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg.train))

    return make


def initialize(model, cfg: RunConfig, ds_config: dict):
    import deepspeed

    groups = parameter_groups(model, cfg)
    optimizer = build_optimizer(groups, cfg)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(cfg), config=ds_config,
    )
    return engine, optimizer, scheduler
