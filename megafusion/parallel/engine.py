"""The DeepSpeed engine around the fused model: parameter groups, optimiser, schedule.

Frozen parameters never enter an optimiser group, so under ZeRO-3 they stay 16-bit
partitions with no gradient, no fp32 master copy and no Adam state. The optimiser is
created here (DeepSpeed wraps it) rather than from the DeepSpeed JSON, so its settings
live in the run config; which implementation steps it depends on where the optimizer
states live (choose_optimizer).
"""
from __future__ import annotations

import sys

import torch

from megafusion.config import RunConfig, lr_multiplier
from megafusion.model.patchers import ImageBlocks
from megafusion.parallel.ds_config import optimizer_offloaded

# Parameters that are rows of an embedding table although they are not an nn.Embedding:
# the begin/end-of-image rows beside the frozen vocabulary and, for untied heads, their
# logit rows (megafusion/model/fusion.py). Decaying them pulls BOI/EOI towards zero while
# every other token's row is untouched.
EMBEDDING_ROWS = ("image_token_embed", "image_token_head", "position")


def _shape(p: torch.Tensor) -> tuple:
    # A ZeRO-3 partitioned parameter's .data is an empty 1-D placeholder; ds_shape is
    # its real shape (with parallel.zero_init every parameter is partitioned by now).
    return tuple(getattr(p, "ds_shape", p.shape))


def decays(module: torch.nn.Module, attr: str, p: torch.Tensor) -> bool:
    """Weight decay only on weight matrices and convolution kernels: never on norms,
    biases, embedding tables or embedding rows, which decay would shrink towards zero
    without regularising anything (their scale is what they encode)."""
    if attr in EMBEDDING_ROWS or isinstance(module, torch.nn.Embedding):
        return False
    if attr == "bias" or "norm" in type(module).__name__.lower():
        return False
    return len(_shape(p)) >= 2


def parameter_groups(model: torch.nn.Module, cfg: RunConfig) -> list[dict]:
    text_ids = set()
    if hasattr(model, "text_tower_parameter_names"):
        names = model.text_tower_parameter_names()
        text_ids = {id(p) for n, p in model.named_parameters() if n in names}
    # A tied parameter has two owners (embedding and LM head): it decays only if both
    # say so. Dicts keep the order of first appearance, so groups are deterministic.
    params, decay = {}, {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and p.requires_grad:
                params[id(p)] = p
                decay[id(p)] = decay.get(id(p), True) and decays(module, attr, p)
    # model.patcher_layers' blocks are new, from-scratch transformer blocks: their own lr.
    block_ids = {id(p) for m in model.modules() if isinstance(m, ImageBlocks) for p in m.parameters()}
    groups = {(tower, d): [] for tower in ("image", "text", "image_blocks") for d in (True, False)}
    for key, p in params.items():
        tower = "text" if key in text_ids else "image_blocks" if key in block_ids else "image"
        groups[(tower, decay[key])].append(p)
    t = cfg.train
    peak = {"image": t.lr, "text": t.text_lr, "image_blocks": t.patcher_layers_lr}
    out = []
    for (tower, decay), params in groups.items():
        if params:
            out.append({
                "params": params,
                "lr": peak[tower],
                "weight_decay": t.weight_decay if decay else 0.0,
                "name": f"{tower}{'' if decay else '_no_decay'}",
            })
    if not out:
        raise SystemExit("error: the model has no trainable parameters")
    return out


def choose_optimizer(offloaded: bool, device_type: str) -> str:
    """Which AdamW steps the trainable parameters:

    - "cpu_adam": optimizer states offloaded (ZeRO-Offload, CPU or NVMe): the step runs
      on the CPU over fp32 master weights, where DeepSpeed's vectorised C++ Adam is
      2-5x faster than torch's;
    - "fused": on a GPU or the CPU without offload (torch's fused AdamW, fused=True).
      Measured on the CPU (one thread, the demo's 106M trainable parameters in 270
      tensors): 0.05 s per step, against 0.30 s for the per-tensor loop and 0.49 s for
      foreach;
    - "foreach": another accelerator (multi-tensor kernels where no fused one is known).
    """
    if offloaded:
        return "cpu_adam"
    if device_type in ("cuda", "cpu"):
        return "fused"
    return "foreach"


def optimizer_kind(cfg: RunConfig, ds_config: dict | None, device_type: str) -> str:
    """train.optimizer resolved: "auto" is choose_optimizer's pick; an explicit choice is
    checked against where the optimizer states live, in one line."""
    offloaded = optimizer_offloaded(ds_config or {})
    kind = cfg.train.optimizer
    if kind == "auto":
        return choose_optimizer(offloaded, device_type)
    if kind == "cpu_adam" and not offloaded:
        raise SystemExit("error: train.optimizer=cpu_adam steps optimizer states offloaded to the CPU; this "
                         "DeepSpeed config keeps them on the device (use auto, or an offload config)")
    if kind in ("deepspeed_fused", "apex_fused") and (offloaded or device_type != "cuda"):
        where = "offloaded to the CPU" if offloaded else f"on {device_type}"
        raise SystemExit(f"error: train.optimizer={kind} is a CUDA kernel; the optimizer states here live {where} "
                         "(use auto)")
    return {"torch_fused": "fused"}.get(kind, kind)


def build_optimizer(groups: list[dict], cfg: RunConfig, ds_config: dict | None = None,
                    device_type: str | None = None) -> torch.optim.Optimizer:
    t = cfg.train
    if device_type is None:
        from deepspeed.accelerator import get_accelerator

        device_type = get_accelerator().device_name()
    kind = optimizer_kind(cfg, ds_config, device_type)
    common = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if kind == "cpu_adam":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # The first use JIT-compiles DeepSpeed's cpu_adam op (ninja + a C++
            # compiler, about 2 minutes on 2 cores); later runs load the cached build.
            return DeepSpeedCPUAdam(groups, adamw_mode=True, **common)
        except Exception as exc:  # no compiler / op not buildable here
            if t.optimizer == "cpu_adam":
                raise SystemExit(f"error: train.optimizer=cpu_adam: DeepSpeedCPUAdam unavailable ({_first_line(exc)})")
            # zero_force_ds_cpu_optimizer is false in ds_configs/zero3_offload.json so
            # that DeepSpeed accepts torch's AdamW in that case; say so, it is slower.
            print(f"warning: DeepSpeedCPUAdam unavailable ({_first_line(exc)}); "
                  "stepping the offloaded optimizer with torch.optim.AdamW (slower)", file=sys.stderr, flush=True)
            kind = "fused"
    if kind == "deepspeed_fused":
        try:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **common)  # JIT-builds its CUDA op on first use
        except Exception as exc:
            raise SystemExit(f"error: train.optimizer=deepspeed_fused: DeepSpeed's FusedAdam unavailable "
                             f"({_first_line(exc)})") from None
    if kind == "apex_fused":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            from megafusion.model.fused_norm import INSTALL

            raise SystemExit(f"error: train.optimizer=apex_fused: {INSTALL}") from None
        return FusedAdam(groups, adam_w_mode=True, **common)
    if kind == "fused":
        return torch.optim.AdamW(groups, fused=True, **common)
    return torch.optim.AdamW(groups, foreach=True, **common)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def build_scheduler(cfg: RunConfig):
    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg.train))

    return make


def initialize(model, cfg: RunConfig, ds_config: dict):
    import deepspeed

    groups = parameter_groups(model, cfg)
    optimizer = build_optimizer(groups, cfg, ds_config)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(cfg), config=ds_config,
    )
    hold_tied_embedding(model, ds_config)
    if ds_config.get("checkpoint", {}).get("load_universal"):
        from megafusion.parallel import elastic

        elastic.keep_group_settings(engine)  # ZeRO-3's universal load gives every group group 0's settings
    return engine, optimizer, scheduler


def hold_tied_embedding(model, ds_config: dict) -> None:
    """Under ZeRO-3, keep a tied embedding gathered from the start of the forward pass to
    the end of the backward: it is the LM head too, used at both ends of the step, and
    released after the embedding it is gathered twice more (at the head, and for the
    backward). An untied embedding, frozen and with no backward, is gathered once and
    released after its forward use (tests/plan/test_plan.py measures both)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3 or not getattr(model, "tied_embeddings", False):
        return
    from deepspeed.runtime.zero import register_external_parameter

    register_external_parameter(model, model.embed_tokens.weight)
