"""The base model's tensors read one at a time, for builders that must not hold all of it.

A pipeline stage owns a few decoder layers of a model whose whole fp32 copy would not fit
in a node's host memory (70B: 282 GB per rank). It builds the model's structure on the
meta device (shapes, no storage; skeleton_base_model) and then gives real tensors to the
modules it owns only (materialize), each read from the safetensors files by key: a file
is memory-mapped, and only the pages of the requested tensors are read.

Under ZeRO-3 (parallel.zero_init) the base is born partitioned and only rank 0 reads it
(load_base_zero3): transformers' own ZeRO-3 loading reads every shard whole on every
rank and then uses rank 0's copy only (see load_base_zero3).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from megafusion.model.loading import BaseModelError, load_base_configs, resolve_base

UNDERSTANDING = "understanding:"  # names of a LLaVA base's vision parts (VisionUnderstanding.vlm's own)


class BaseWeights:
    """Key -> tensor of a Hugging Face checkpoint directory (one model.safetensors or a
    sharded one with model.safetensors.index.json). `reads` lists the keys read so far.

    Names are the text tower's LlamaForCausalLM names; for a LLaVA base also
    UNDERSTANDING + a name inside its inner model without the language model
    (vision_tower..., multi_modal_projector..., image_newline). They are found under the
    VLM's keys in either layout transformers saves: model.language_model.* / model.* (4.52
    and later) or language_model.model.* / language_model.lm_head / bare (earlier, as
    llava-hf's checkpoints on the Hub)."""

    def __init__(self, base: str):
        self.base = base
        self.dir = Path(resolve_base(base))
        self.config, self.vlm_config = load_base_configs(base)  # vlm_config: None for a Llama base
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
        if self.vlm_config is not None:
            return self._vlm_key(name)
        if name == "lm_head.weight" and name not in self.file_of and getattr(self.config, "tie_word_embeddings", False):
            return "model.embed_tokens.weight"
        return name

    def _vlm_key(self, name: str) -> str:
        if name.startswith(UNDERSTANDING):
            inner = name[len(UNDERSTANDING):]
            candidates = [f"model.{inner}", inner]
        elif name.startswith("model."):
            candidates = [f"model.language_model.{name[len('model.'):]}", f"language_model.{name}"]
        else:  # lm_head
            candidates = [name, f"language_model.{name}"]
            if getattr(self.config, "tie_word_embeddings", False):
                candidates += [self._vlm_key("model.embed_tokens.weight")]
        return next((c for c in candidates if c in self.file_of), candidates[0])

    def check_shapes(self, shapes) -> str | None:
        """None if every (name, shape) has a tensor of that shape in the files, else a
        one-line error naming the first that has not. Reads the files' headers only."""
        from safetensors import safe_open

        by_file: dict[Path, list] = {}
        for name, shape in shapes:
            key = self.key_for(name)
            if key not in self.file_of:
                return f"model.base={self.base}: no tensor {key!r} in {self.dir}"
            by_file.setdefault(self.file_of[key], []).append((key, tuple(shape)))
        for path, wanted in by_file.items():
            with safe_open(str(path), "pt") as f:
                for key, shape in wanted:
                    found = tuple(f.get_slice(key).get_shape())
                    if found != shape:
                        return f"model.base={self.base}: {key} has shape {found}, the model expects {shape}"
        return None

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


READER_RANK = 0  # the one rank that reads the base's files under ZeRO-3


def load_base_zero3(base: str, dtype: torch.dtype, ds_config: dict):
    """(the base LlamaForCausalLM, None) born partitioned under ZeRO-3 (`ds_config`), in
    `dtype`, its weights read from the safetensors files by rank 0 alone; for a LLaVA base
    (its language model as a LlamaForCausalLM, its VisionUnderstanding), both
    partitioned, as load_base splits the VLM.

    transformers 4.57's from_pretrained under an HfDeepSpeedConfig reads every shard whole
    on every rank: modeling_utils.load_shard_file asks load_state_dict for
    map_location="cpu" when ZeRO-3 is on, which calls safe_open(...).get_tensor for every
    key, and integrations/deepspeed.py's _load_state_dict_into_zero3_model then copies the
    values in on rank 0 only (GatheredParameters(modifier_rank=0)); the other ranks' reads
    are thrown away (its map_location="meta" shortcut for ranks > 0 exists for torch.load
    .bin files only). At 64 nodes x 8 GPUs that is 512 reads of a 140 GB 70B base.

    Here the structure is built as transformers 4.57's _from_config builds it under an
    HfDeepSpeedConfig (deepspeed.zero.Init from that config, with set_zero3_state so that
    _from_config does not open a second one), under no_init_weights: no random
    initialisation of weights that are about to be overwritten. The zero.Init is opened
    here rather than by _from_config because transformers 5's _from_config, after its own
    zero.Init, re-initialises every weight (integrations/deepspeed.py
    initialize_weights_zero3: each module gathered whole, initialised on rank 0 from the
    global RNG, broadcast), which no_init_weights does not stop: a 70B base would be
    gathered and broadcast once for nothing, and rank 0's RNG would advance, so the image
    tower's seeds would differ from the model built whole. Then each
    parameter is filled inside GatheredParameters(modifier_rank=0): rank 0 reads that one
    tensor from its memory-mapped file and copies it in (the same cast as from_pretrained,
    param.copy_), DeepSpeed broadcasts it on leaving the context and every rank keeps its
    partition. Ranks other than rank 0 open no safetensors file; at most one tensor is
    whole at a time. A missing tensor or a wrong shape is found by rank 0 from the files'
    headers before any weight moves and raised on every rank.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups
    from transformers import LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.modeling_utils import set_zero3_state
    try:  # transformers 5 moved it to transformers.initialization
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    from megafusion.parallel.gather import gathered

    text_config, vlm_config = load_base_configs(base)
    config = vlm_config if vlm_config is not None else text_config
    config.name_or_path = str(resolve_base(base))  # as from_pretrained records it
    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers reads it through a global weak reference
    understanding = None
    subs = [getattr(config, k, None) for k in getattr(config, "sub_configs", {})]
    stored_dtypes = [(c, getattr(c, "dtype", None)) for c in [config, *subs] if c is not None]
    # The contexts transformers 4.57's _from_config enters under ZeRO-3 (see the docstring).
    # The node-local group of ZeRO++ hpZ, when one exists: a zero.Init that is not handed
    # it creates it, which asserts the second time (model_setup.zero_init).
    hpz_group = groups._get_zero_param_intra_parallel_group()
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=keep_alive.config,
                                                zero_param_parallel_group=hpz_group), set_zero3_state():
        if vlm_config is None:
            model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
        else:  # a LLaVA base, born partitioned whole, then split as load_base splits it
            from transformers import AutoModelForImageTextToText

            from megafusion.model.vlm import split_vlm

            vlm = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
            model, understanding = split_vlm(vlm)
    # transformers 5's _from_config writes the dtype it built in into the config and its
    # sub-configs; 4.x and the whole build (load_base, read in fp32) keep the stored one.
    for c, stored in stored_dtypes:
        c.dtype = stored
    model.tie_weights()  # no_init_weights also skips post_init's tying; from_pretrained ties here too
    params = list(model.named_parameters())  # a tied head appears once, as the embedding
    if understanding is not None:
        params += [(UNDERSTANDING + n, p) for n, p in understanding.vlm.named_parameters()]

    weights, error = None, None
    if dist.get_rank() == READER_RANK:
        try:
            weights = BaseWeights(base)
            error = weights.check_shapes((name, tuple(p.ds_shape)) for name, p in params)
        except ValueError as exc:
            error = str(exc)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=READER_RANK)
    if verdict[0] is not None:
        raise BaseModelError(verdict[0])

    with torch.no_grad():
        for name, p in params:
            with gathered([p], modifier_rank=READER_RANK):
                if weights is not None:
                    p.data.copy_(weights.get(name))
    return model.eval(), (understanding.eval() if understanding is not None else None)  # as from_pretrained returns them
