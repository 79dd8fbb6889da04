"""The fused model as a DeepSpeed PipelineModule (pipeline stages + ZeRO-1).

Stages exchange tuples of tensors. What routing and the hybrid mask need (modality,
positions, document and image ids, LM targets) travels as integer tensors; the diffusion
target and the timesteps, which the last stage needs but which must not receive
gradients, travel bit-cast to integers (DeepSpeed sends gradients back for every
floating-point tensor a stage emits). Each stage rebuilds Routing and the attention
layout from the ids, which costs an argsort and a mask per layer and keeps the wire
format simple.

Layers: [embed] + [one per decoder layer] + [head with both losses], partitioned by
trainable parameters (DeepSpeed's "parameters" method). The topology puts the pipeline
axis fastest (ranks 0..P-1 are one pipeline), so the data loader can give consecutive
ranks the same samples with streaming's `replication`.

Tied embeddings: the new begin/end-of-image rows are used by the embedding (first
stage) and by the LM head (last stage); across stages they are untied (the head gets
its own copy, initialised equal). Neither row is a target under the default
lm_loss_on_boi=False, so the head copy receives no gradient anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megafusion.config import RunConfig
from megafusion.model.attention import AttentionLayout, select_backend
from megafusion.model.batch import IGNORE_INDEX, PackedBatch
from megafusion.model.fusion import LMFusionModel
from megafusion.model.routing import Routing

_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_FLOAT_CODES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}


def _to_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(_INT_OF[x.dtype])


def _from_bits(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.view(dtype)


def batch_to_inputs(batch: PackedBatch) -> tuple:
    images = batch.images if batch.images.numel() or batch.images.dim() == 4 else batch.images.reshape(0, 1, 1, 1)
    return (batch.input_ids, batch.labels, batch.modality, batch.position_ids, batch.document_ids, batch.image_ids,
            _to_bits(images.float()), torch.tensor(list(images.shape), dtype=torch.long),
            _to_bits(batch.timesteps.float()), torch.tensor([int(batch.images_are_latents)]))


class _Stage(nn.Module):
    def __init__(self, fused: LMFusionModel):
        super().__init__()
        # A plain attribute, not a submodule: stages must not own each other's weights.
        object.__setattr__(self, "fused", fused)

    def routing_and_layout(self, modality, document_ids, image_ids):
        """Routing and attention layout of a micro-batch, built once per stage: the
        decoder stages of one pipeline rank hand the very same tensors along, so the
        last result is reused while its inputs are the same objects (a FlexAttention
        BlockMask or a 4096x4096 mask is not rebuilt for every layer; activation
        recomputation in backward reuses it too). The cache holds the key tensors, so
        their ids cannot be recycled while it does."""
        f = self.fused
        key = (modality, document_ids, image_ids)
        cached = getattr(f, "_pipeline_layout_cache", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        backend = select_backend(f.attention_backend, modality.device, primitive=f.attention_primitive)
        value = (Routing.from_modality(modality),
                 AttentionLayout.build(document_ids, image_ids, backend, primitive=f.attention_primitive))
        object.__setattr__(f, "_pipeline_layout_cache", (key, value))
        return value


class EmbedStage(_Stage):
    def __init__(self, fused: LMFusionModel):
        super().__init__(fused)
        self.embed_tokens = fused.embed_tokens
        self.image_token_embed = fused.image_token_embed
        self.embedder = fused.image_tokenizer.embedder
        self.vae = fused.image_tokenizer.vae

    def forward(self, inputs):
        input_ids, labels, modality, position_ids, document_ids, image_ids, img_bits, img_shape, t_bits, are_latents = inputs
        f = self.fused
        routing = Routing.from_modality(modality)
        batch = PackedBatch(input_ids, labels, modality, position_ids, document_ids, image_ids,
                            images=torch.empty(0), timesteps=torch.empty(0), image_is_condition=torch.empty(0))
        targets = f.lm_targets(batch)
        dtype = self.image_token_embed.dtype
        parts = [f.embed(input_ids.reshape(-1)[routing.text_positions])] if routing.n_text else []
        t = _from_bits(t_bits, torch.float32)
        if routing.n_image:
            x0 = _from_bits(img_bits, torch.float32).view(*img_shape.tolist()).to(dtype)
            if not bool(are_latents.item()):
                x0 = f.image_tokenizer.encode_images(x0).to(dtype)
            noise = torch.randn_like(x0)
            x_t = f.objective.add_noise(x0, noise, t)
            tokens, _ = f.image_tokenizer.embed(x_t, t)
            parts.append(tokens.reshape(-1, tokens.shape[-1]).to(parts[0].dtype if parts else dtype))
            target = f.objective.target(x0, noise, t).float()
        else:
            target = torch.zeros(0, 1, 1, 1)
        h = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return (h, modality, position_ids, document_ids, image_ids, targets,
                _to_bits(target.contiguous()), torch.tensor(list(target.shape), dtype=torch.long), t_bits)


class DecoderStage(_Stage):
    def __init__(self, fused: LMFusionModel, index: int):
        super().__init__(fused)
        self.layer = fused.layers[index]
        self.rotary_emb = fused.rotary_emb

    def forward(self, inputs):
        h, modality, position_ids, document_ids, image_ids, *rest = inputs
        routing, layout = self.routing_and_layout(modality, document_ids, image_ids)
        cos, sin = self.rotary_emb(h, position_ids)
        h = self.layer(h, routing, cos, sin, layout)
        return (h, modality, position_ids, document_ids, image_ids, *rest)


class HeadStage(_Stage):
    """Both losses; returns [total, lm, diffusion] (the engine's loss_fn takes [0])."""

    def __init__(self, fused: LMFusionModel):
        super().__init__(fused)
        self.text_norm = fused.text_norm
        self.lm_head = fused.lm_head
        self.image_norm = fused.image_norm
        self.predictor = fused.image_tokenizer.predictor
        head = fused.image_token_embed if fused.tied_embeddings else fused.image_token_head
        self.image_token_head = nn.Parameter(head.detach().clone())

    def forward(self, inputs):
        h, modality, position_ids, document_ids, image_ids, targets, tgt_bits, tgt_shape, t_bits = inputs
        f = self.fused
        routing = Routing.from_modality(modality)
        zero = h.new_zeros(())
        lm = diff = zero.float()
        if routing.n_text:
            tgt = targets.reshape(-1)[routing.text_positions]
            sel = tgt != IGNORE_INDEX
            if bool(sel.any()):
                x = self.text_norm(h[: routing.n_text][sel])
                logits = torch.cat([self.lm_head(x), x @ self.image_token_head.to(x.dtype).t()], dim=-1)
                lm = F.cross_entropy(logits.float(), tgt[sel])
        if routing.n_image:
            t = _from_bits(t_bits, torch.float32)
            target = _from_bits(tgt_bits, torch.float32).view(*tgt_shape.tolist())
            n_img = target.shape[0]
            hi = self.image_norm(h[routing.n_text:]).view(n_img, f.tokens_per_image, -1)
            pred = self.predictor(hi, t)
            noised = t > 0
            if bool(noised.any()):
                diff = F.mse_loss(pred[noised].float(), target[noised])
        total = lm + f.cfg.diffusion_loss_weight * diff
        out = torch.stack([total, lm.detach(), diff.detach()])
        if hasattr(self, "records"):
            self.records.append(out.detach())
        return out


def build_pipeline_module(fused: LMFusionModel, cfg: RunConfig, world_size: int):
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    P = cfg.parallel.pipeline_stages
    if world_size % P:
        raise SystemExit(f"error: parallel.pipeline_stages={P} does not divide the world size {world_size}")
    layers = [EmbedStage(fused)] + [DecoderStage(fused, i) for i in range(len(fused.layers))] + [HeadStage(fused)]
    topo = ProcessTopology(axes=["data", "pipe"], dims=[world_size // P, P])
    module = PipelineModule(layers=layers, topology=topo, loss_fn=lambda out, _labels: out[0],
                            partition_method="parameters", dynamic_shape=True)
    module.tokens_per_image = fused.tokens_per_image
    module.llama_config = fused.llama_config
    return module


def initialize_pipeline(fused: LMFusionModel, cfg: RunConfig, ds_config: dict):
    import deepspeed

    from megafusion.parallel.engine import build_optimizer, build_scheduler, parameter_groups
    import torch.distributed as dist

    module = build_pipeline_module(fused, cfg, dist.get_world_size())
    optimizer = build_optimizer(parameter_groups(module, cfg), cfg, ds_config)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                           lr_scheduler=build_scheduler(cfg), config=ds_config)
    return engine, optimizer, scheduler
