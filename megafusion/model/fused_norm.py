"""NVIDIA apex's fused RMSNorm for the image tower's norms (model.fused_rmsnorm=apex).

Optional and never required: apex is built from source against CUDA
(github.com/NVIDIA/apex, with --cuda_ext; the PyPI package named `apex` is an unrelated
project), so it is imported only when the option asks for it. Only the trainable tower's
norms change: the frozen text tower stays the base's own modules, bit for bit.

The fused module takes over the Llama norm's weight Parameter itself (the same object, so
a ZeRO-3 partition, its name in checkpoints and exports, and requires_grad are all kept)
and its epsilon. Whether it pays is measured by tools/gpu_check.py where apex is installed.
"""
from __future__ import annotations

import torch.nn as nn

INSTALL = ("NVIDIA apex is not installed: build it from github.com/NVIDIA/apex with its CUDA extensions "
           "(the PyPI package 'apex' is an unrelated project)")


def apex_rmsnorm_class() -> type:
    """apex.normalization.FusedRMSNorm, or ValueError (one line) naming the option."""
    try:
        from apex.normalization import FusedRMSNorm
    except ImportError:
        raise ValueError(f"model.fused_rmsnorm=apex: {INSTALL}") from None
    return FusedRMSNorm


def fused_twin(norm: nn.Module, fused_cls: type) -> nn.Module:
    """fused_cls (apex's FusedRMSNorm signature) in place of a LlamaRMSNorm, sharing its
    weight Parameter and epsilon."""
    weight = norm.weight
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise TypeError(f"{type(norm).__name__} has no epsilon to carry over")
    shape = getattr(weight, "ds_shape", weight.shape)  # a ZeRO-3 partition's whole shape
    fused = fused_cls(tuple(shape), eps=float(eps), elementwise_affine=True)
    fused.weight = weight
    return fused


def image_norms(model_cfg, norm: nn.Module) -> nn.Module:
    """The module the image tower uses for a norm cloned from the text tower."""
    if getattr(model_cfg, "fused_rmsnorm", "none") == "apex":
        return fused_twin(norm, apex_rmsnorm_class())
    return norm
