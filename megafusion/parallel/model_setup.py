"""Building the fused model on every rank.

Small models are built whole on each rank and partitioned by deepspeed.initialize. For
large ones (parallel.zero_init, ZeRO-3) no rank ever holds the whole model, and no rank
but rank 0 reads the base:
- the base model is born partitioned and read by rank 0 alone
  (megafusion/parallel/base_weights.py, load_base_zero3): built under zero.Init as
  transformers builds it, then filled one parameter at a time inside
  GatheredParameters(modifier_rank=0), rank 0 reading that tensor from its
  memory-mapped safetensors file and DeepSpeed's broadcast handing it to the others
  (transformers' own ZeRO-3 from_pretrained reads every shard on every rank);
- each image-tower module (and the image norm) is copied from its text twin rank by
  rank, without gathering (partitioned_twin): the twin has the same parameter shapes
  and is partitioned by the same rules over the same group, so each rank's partition of
  a twin parameter is the same slice as its partition of the text parameter and is
  copied from it. A parameter whose partitions do not correspond (quantized frozen
  partitions, NVMe offload, a different group) is copied by gathering instead, with a
  warning naming the reason;
- whatever is new (image tokenizer, its VAE, BOI/EOI rows) gets its parameters cast to
  the training dtype before zero.Init(module=...) partitions it: zero.Init(module=...)
  partitions without casting, and ZeRO-3 asserts that all trainable partitions share
  one dtype. Parameters only, not buffers (time-embedding frequencies, rotary inv_freq
  stay fp32): exactly the cast deepspeed.initialize applies to a model built whole, so
  both paths train the same model. The image tower is born in the training dtype
  already (the base is loaded in it). One difference remains when the base is stored in
  fp32 and training is bf16: the BOI/EOI rows start at the mean of the embedding,
  computed from the bf16 embedding here and from the fp32 one when built whole, so they
  differ by the embedding's rounding error, which does not cancel in so small a mean
  (tiny test base: ~1e-7 on a mean of ~1e-4, rows of ~0.02); a base stored in bf16, as
  Llama 3's is, gives the same rows both ways.

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
from megafusion.model.loading import load_base
from megafusion.parallel.base_weights import load_base_zero3
from megafusion.parallel.gather import gathered


def model_dtype(cfg: RunConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32


def build_model(cfg: RunConfig, ds_config: dict) -> LMFusionModel:
    if cfg.parallel.zero_stage == 3 and getattr(cfg.parallel, "zero_init", False):
        return _build_zero3_partitioned(cfg, ds_config)
    base, understanding = load_base(cfg.model.base, dtype=torch.float32)
    return LMFusionModel(base, cfg.model, understanding=understanding)


def cast_unpartitioned(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters that are not partitioned yet (no ds_id) to
    dtype, in place; partitioned ones were born in dtype already."""
    for p in module.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _partitions_differ(text: torch.nn.Parameter, twin: torch.nn.Parameter) -> str | None:
    """Why the twin's partitions cannot be copied from the text parameter's, or None
    when each rank's partition of one is the same slice as its partition of the other."""
    if getattr(text, "ds_tensor", None) is None or getattr(twin, "ds_tensor", None) is None:
        return "no local partition"
    if tuple(text.ds_shape) != tuple(twin.ds_shape) or text.ds_numel != twin.ds_numel:
        return f"shapes {tuple(text.ds_shape)} and {tuple(twin.ds_shape)}"
    if (text.ds_zero_partition_world_size, text.ds_zero_partition_rank) != \
            (twin.ds_zero_partition_world_size, twin.ds_zero_partition_rank):
        return "partitioned over different groups"
    for which in ("ds_tensor", "ds_secondary_tensor"):  # the second: ZeRO++ hpZ's node-local copy
        a, b = getattr(text, which, None), getattr(twin, which, None)
        if a is None and b is None:
            continue
        if a is None or b is None:
            return f"{which} on one side only"
        if hasattr(a, "ds_quant_scale") or hasattr(b, "ds_quant_scale"):
            return "the frozen partition is quantized (zero_quantized_nontrainable_weights)"
        # final_location is OffloadDeviceEnum.nvme, whose str() is "OffloadDeviceEnum.nvme".
        if any("nvme" in str(getattr(t, "final_location", None)) for t in (a, b)):
            return "a partition is swapped out to NVMe"
        if a.dtype != b.dtype or a.numel() != b.numel():
            return f"{which} {a.dtype} x {a.numel()} against {b.dtype} x {b.numel()}"
    return None


def partitioned_twin(module: torch.nn.Module, init) -> torch.nn.Module:
    """A trainable twin of a partitioned text-tower module, made from each rank's own
    partitions: no collective, and at most one of its parameters whole at a time (an
    uninitialised buffer, of which only this rank's slice is ever touched).

    `init` is a deepspeed.zero.Init built from the run's DeepSpeed config, used for its
    partitioning rules only. Each twin parameter is converted and partitioned the way
    zero.Init(module=...) does it, minus the broadcast from rank 0 with which zero.Init
    makes random initialisations agree: every partition is overwritten here, so that
    broadcast would move a whole layer of garbage. (_convert_to_deepspeed_param is
    DeepSpeed's own per-parameter step of zero.Init; DeepSpeed offers no public way to
    partition without that broadcast. tests/parallel/test_zero_init_startup.py checks
    the result against the model built whole.)"""
    text = dict(module.named_parameters())
    # The structure and non-parameter state are copied; the partitioned parameters are
    # not (a deepcopy of one would claim to be partitioned already).
    memo = {id(p): torch.nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=True) for p in text.values()}
    twin = copy.deepcopy(module, memo)
    for name, p in twin.named_parameters():
        src = text[name]
        p.data = torch.empty(src.ds_shape, dtype=src.dtype, device=init.local_device)
        init._convert_to_deepspeed_param(p)
        p.partition()
        reason = _partitions_differ(src, p)
        if reason is None:
            p.ds_tensor.data.copy_(src.ds_tensor.data)
            if src.ds_secondary_tensor is not None:
                p.ds_secondary_tensor.data.copy_(src.ds_secondary_tensor.data)
            continue
        _warn_once(f"warning: image-tower parameters are copied by gathering them whole ({reason}; first: {name})")
        with torch.no_grad(), gathered([src]), gathered([p], modifier_rank=0):
            p.data.copy_(src.data)
    return twin


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    import torch.distributed as dist

    key = msg.split(";")[0]
    if key not in _warned and (not dist.is_initialized() or dist.get_rank() == 0):
        print(msg, flush=True)
    _warned.add(key)


def zero_init(ds_config: dict, **kwargs):
    """deepspeed.zero.Init under the run's DeepSpeed config. With ZeRO++ hpZ
    (zero_hpz_partition_size > 1) a zero.Init that is not handed the node-local group
    creates it, and creating it a second time in a process is an assertion (DeepSpeed
    issue 4901): start-up builds several (transformers' in load_base_zero3, then these),
    so each reuses the group that exists."""
    import deepspeed
    from deepspeed.utils import groups

    return deepspeed.zero.Init(config_dict_or_path=ds_config,
                               zero_param_parallel_group=groups._get_zero_param_intra_parallel_group(), **kwargs)


def _build_zero3_partitioned(cfg: RunConfig, ds_config: dict) -> LMFusionModel:
    base, understanding = load_base_zero3(cfg.model.base, model_dtype(cfg), ds_config)  # understanding: LLaVA only
    init = zero_init(ds_config)  # its rules; not entered as a context

    model = LMFusionModel(base, cfg.model, clone=lambda module: partitioned_twin(module, init), gather=gathered,
                          understanding=understanding)
    cast_unpartitioned(model, model_dtype(cfg))
    # What is still whole (image tokenizer, U-Net blocks, BOI/EOI rows) is
    # partitioned now rather than at deepspeed.initialize; already partitioned
    # parameters are skipped.
    zero_init(ds_config, module=model)
    place_buffers(model, init.local_device)
    return model


def place_buffers(model: torch.nn.Module, device) -> None:
    """Buffers onto the ranks' device. zero.Init(module=...) moves only parameters, and
    deepspeed.initialize skips module.to(device) for a model that has partitioned ones,
    so the buffers of modules built outside zero.Init (the alignment encoder's pixel
    mean and std, a CLIP's position ids) would stay on the CPU and the first forward
    on a GPU would mix devices."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)
