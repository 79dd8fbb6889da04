"""Building the fused model on every rank.

Small models are built whole on each rank and partitioned by deepspeed.initialize. For
large ones (parallel.zero_init, ZeRO-3) no rank ever holds the whole model:
- the base model loads through transformers' DeepSpeed integration (an HfDeepSpeedConfig
  alive during from_pretrained makes it construct under zero.Init and load each weight
  through GatheredParameters), so the text tower is born partitioned;
- each image-tower module is copied from its text twin one module at a time inside
  GatheredParameters and partitioned right away with zero.Init(module=...), so the peak
  is one decoder layer;
- whatever is new (image tokenizer, its VAE, BOI/EOI rows, image norm) gets its
  parameters cast to the training dtype before zero.Init(module=...) partitions it:
  zero.Init(module=...) partitions without casting, and ZeRO-3 asserts that all
  trainable partitions share one dtype. Parameters only, not buffers (time-embedding
  frequencies, rotary inv_freq stay fp32): exactly the cast deepspeed.initialize applies
  to a model built whole, so both paths train the same model.

Activation checkpointing (model.activation_checkpointing) is torch's non-reentrant
checkpoint, installed by the model itself (megafusion/model/fusion.py), not DeepSpeed's
deepspeed.checkpointing: the non-reentrant form recomputes through ZeRO-3's parameter
hooks with frozen parameters (deepspeed >= 0.19.3), takes the layer's non-tensor
arguments (routing, attention layout) as they are, and keeps the model package free of
DeepSpeed; DeepSpeed's extras (partition_activations, contiguous buffers) need tensor
parallelism, which this stack does not use. tests/parallel/test_production_precision.py
covers it under ZeRO-3 + bf16 on two ranks.
"""
from __future__ import annotations

import copy

import torch

from megafusion.config import RunConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import load_base_model
from megafusion.parallel.gather import gathered


def model_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32


def build_model(cfg: RunConfig, ds_config: dict) -> LMFusionModel:
    if cfg.parallel.zero_stage == 3 and getattr(cfg.parallel, "zero_init", False):
        return _build_zero3_partitioned(cfg, ds_config)
    base = load_base_model(cfg.model.base, dtype=torch.float32)
    return LMFusionModel(base, cfg.model)


def _fresh_parameters(module: torch.nn.Module) -> None:
    """Replace every parameter by a plain tensor copy without ZeRO-3's ds_* attributes
    (a deepcopy of a partitioned parameter would claim to be partitioned already)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.data.clone(), requires_grad=True)


def cast_unpartitioned(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters that are not partitioned yet (no ds_id) to
    dtype, in place; partitioned ones were born in dtype already."""
    for p in module.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _build_zero3_partitioned(cfg: RunConfig, ds_config: dict) -> LMFusionModel:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers reads it globally)
    base = load_base_model(cfg.model.base, dtype=model_dtype(cfg))

    def clone(module):
        params = list(module.parameters())
        with gathered(params):
            twin = copy.deepcopy(module)
            _fresh_parameters(twin)
        deepspeed.zero.Init(module=twin, config_dict_or_path=ds_config)
        return twin

    model = LMFusionModel(base, cfg.model, clone=clone, gather=gathered)
    cast_unpartitioned(model, model_dtype(cfg))
    # What is still whole (image tokenizer, U-Net blocks, image norm, BOI/EOI rows) is
    # partitioned now rather than at deepspeed.initialize; already partitioned
    # parameters are skipped.
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    return model
