"""The base model's tensors read one at a time, for builders that must not hold all of it.

A pipeline stage owns a few decoder layers of a model whose whole fp32 copy would not fit
in a node's host memory (70B: 282 GB per rank). It builds the model's structure on the
meta device (shapes, no storage; skeleton_base_model) and then gives real tensors to the
modules it owns only (materialize), each read from the safetensors files by key: a file
is memory-mapped, and only the pages of the requested tensors are read.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from megafusion.model.loading import load_base_config, resolve_base


class BaseWeights:
    """Key -> tensor of a Hugging Face checkpoint directory (one model.safetensors or a
    sharded one with model.safetensors.index.json). `reads` lists the keys read so far."""

    def __init__(self, base: str):
        self.base = base
        self.dir = Path(resolve_base(base))
        self.config = load_base_config(base)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / "model.safetensors"), "pt") as f:
                self.file_of = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"model.base={base}: {self.dir} has no model.safetensors (pipeline stages read the base "
                             "tensor by tensor from safetensors files)")
        self.reads: list[str] = []

    def key_for(self, name: str) -> str:
        """A tied output head has no tensor of its own on disk: it is the embedding."""
        if name == "lm_head.weight" and name not in self.file_of and getattr(self.config, "tie_word_embeddings", False):
            return "model.embed_tokens.weight"
        return name

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self.key_for(name)
        if key not in self.file_of:
            raise ValueError(f"model.base={self.base}: no tensor {key!r} in {self.dir}")
        self.reads.append(key)
        with safe_open(str(self.file_of[key]), "pt") as f:
            return f.get_tensor(key)


def skeleton_base_model(config):
    """The base LlamaForCausalLM on the meta device: every module and parameter shape, no
    storage and no random initialisation."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def materialize(module: nn.Module, prefix: str, weights: BaseWeights, dtype: torch.dtype) -> None:
    """Give every parameter of `module` (a submodule of skeleton_base_model, on the meta
    device) the base tensor `prefix + name`, cast to dtype; requires_grad is kept.
    Modules shared with a fused skeleton (the text tower is the base's modules) see the
    new parameters too."""
    for name, p in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = weights.get(prefix + name).to(dtype)
        if value.shape != p.shape:
            raise ValueError(f"model.base={weights.base}: {prefix + name} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(p.shape)}")
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=p.requires_grad)
