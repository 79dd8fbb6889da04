"""The fused model as a DeepSpeed PipelineModule (pipeline stages + ZeRO-1).

Stages exchange tuples of tensors. What routing and the hybrid mask need (modality,
positions, document and image ids, LM targets) travels as integer tensors; the diffusion
target and the timesteps, which the last stage needs but which must not receive
gradients, travel bit-cast to integers (DeepSpeed sends gradients back for every
floating-point tensor a stage emits). Each stage rebuilds Routing and the attention
layout from the ids, which costs an argsort and a mask per stage and keeps the wire
format simple. Every tensor a stage emits is on the stage's device: DeepSpeed sends
them as they are, and NCCL's p2p serves CUDA tensors only.

Layers: [embed] + [one per decoder layer] + [head with both losses], given to DeepSpeed
as LayerSpecs, so each rank builds the layers of its own stage only. Every rank holds a
skeleton of the fused model on the meta device (every module and shape, no storage); a
stage's constructor gives real tensors, in the training dtype, to the skeleton modules
it owns: text-tower weights read key by key from the base's safetensors files, image-tower
twins copied from them, its side of the image tokenizer built from that side's own seed
(so the weights equal a single-process run's). Layers of other stages stay on the meta
device and are never read. Peak host memory is one stage's weights plus the tensor being
read (70B, P stages: about 282 GB / P in bf16, instead of the whole fused model in fp32).

Partitioning gives every stage the same number of decoder layers (DeepSpeed's
"type:DecoderStage"); its "parameters" method would build every layer on every rank just
to count parameters. The topology puts the pipeline axis fastest (ranks 0..P-1 are one
pipeline), so the data loader can give consecutive ranks the same samples with
streaming's `replication`.

Activation checkpointing (model.activation_checkpointing): each DecoderStage runs its
layer through LMFusionModel.run_layer, i.e. torch's non-reentrant checkpoint around the
one decoder layer, as the non-pipeline model does; not the PipelineModule's
activation_checkpoint_interval. Reasons: the same recomputation in both paths; Routing,
the attention layout and RoPE tables go into the checkpoint as arguments, so the
recompute in backward reuses them, where a checkpoint around the whole stage call would
rebuild the mask in every layer's recompute (under 1F1B the stage's one-entry layout
cache holds a later micro-batch by then); and DeepSpeed's default function is reentrant,
which needs an input that requires grad and a global checkpointing configuration.

Tied embeddings: the new begin/end-of-image rows are used by the embedding (first
stage) and by the LM head (last stage); across stages they are untied (the head gets
its own copy, initialised equal). Neither row is a target under the default
lm_loss_on_boi=False, so the head copy receives no gradient anyway.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from megafusion.config import RunConfig
from megafusion.model.attention import AttentionLayout, select_backend
from megafusion.model.batch import IGNORE_INDEX, PackedBatch
from megafusion.model.fused_norm import image_norms
from megafusion.model.fusion import NUM_IMAGE_TOKENS, LMFusionModel
from megafusion.model.image_io import ImageTokenizer
from megafusion.model.image_rope import rope_cos_sin
from megafusion.model.routing import Routing, prompt_vectors
from megafusion.model.towers import image_twin
from megafusion.parallel.base_weights import BaseWeights, materialize, skeleton_base_model

def _to_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as int32 on the wire (DeepSpeed computes gradients for the float
    tensors a stage sends). fp32 only: the 16-bit floats would need int16, which NCCL
    does not carry."""
    if x.dtype != torch.float32:
        raise TypeError(f"pipeline wire: {x.dtype} values are sent as float32 (call .float() first)")
    return x.contiguous().view(torch.int32)


def _from_bits(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.view(dtype)


def batch_to_inputs(batch: PackedBatch) -> tuple:
    """The first stage's inputs. The last three are a LLaVA base's understood images
    (bit-cast pixels, their shape, image sizes), empty when there are none."""
    images = batch.images if batch.images.numel() or batch.images.dim() == 4 else batch.images.reshape(0, 1, 1, 1)
    device = batch.input_ids.device
    vlm = batch.vlm_pixel_values if batch.vlm_pixel_values is not None else torch.zeros(0, 1, 1, 1, device=device)
    sizes = batch.vlm_image_sizes if batch.vlm_image_sizes is not None else torch.zeros(0, 2, dtype=torch.long,
                                                                                         device=device)
    return (batch.input_ids, batch.labels, batch.modality, batch.position_ids, batch.document_ids, batch.image_ids,
            _to_bits(images.float()), torch.tensor(list(images.shape), dtype=torch.long, device=device),
            _to_bits(batch.timesteps.float()), torch.tensor([int(batch.images_are_latents)], device=device),
            _to_bits(vlm.float()), torch.tensor(list(vlm.shape), dtype=torch.long, device=device), sizes)


class StageSource:
    """What the stages of one rank are built from: the fused model's skeleton on the meta
    device, the base's tensors on disk and the training dtype."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        self.weights = BaseWeights(cfg.model.base)
        if cfg.model.train_text_tower and getattr(self.weights.config, "tie_word_embeddings", False):
            # The embedding lives on the first stage and the LM head on the last: one
            # tied matrix would train as two, and the export keeps only one of them.
            raise ValueError(f"model.train_text_tower (model.tower_mode={cfg.model.tower_mode}) with pipeline stages "
                             f"needs a base with untied embeddings; {cfg.model.base} ties its embedding and LM head")
        understanding = None
        if self.weights.vlm_config is not None:  # a LLaVA base: its language model and vision parts
            from transformers import AutoModelForImageTextToText

            from megafusion.model.vlm import split_vlm

            with torch.device("meta"):
                self.base, understanding = split_vlm(AutoModelForImageTextToText.from_config(self.weights.vlm_config))
        else:
            self.base = skeleton_base_model(self.weights.config)
        # The image tokenizer's seed is the draw a single-process run makes (its rank 0
        # draws it right after torch.manual_seed(run.seed), nothing random before), so a
        # stage's side starts equal to that run's. This rank's own stream then advances by
        # that one draw, as building the whole model advances it, so the diffusion noise
        # drawn next is the stream a non-pipeline run draws. No side is built yet.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            seed = ImageTokenizer.draw_seed()
        ImageTokenizer.draw_seed()
        tokenizer = ImageTokenizer(cfg.model, self.weights.config.hidden_size, sides=(), side_seed=seed)
        self.fused = LMFusionModel(self.base, cfg.model, image_tokenizer=tokenizer, understanding=understanding)
        self._rotary = None

    def __repr__(self) -> str:  # LayerSpec logs its arguments
        return f"StageSource({self.cfg.model.base})"

    def load(self, module: nn.Module, prefix: str) -> None:
        materialize(module, prefix, self.weights, self.dtype)

    def cast(self, module: nn.Module) -> nn.Module:
        """Floating-point parameters to the training dtype; buffers (RoPE's inv_freq)
        stay as they are, as DeepSpeed's own cast leaves them."""
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.to(self.dtype)
        return module

    def keep_tie(self, other: nn.Module, built: nn.Module) -> None:
        """A tied base's embedding and head are one tensor. When this rank builds one of
        them, the skeleton's other (not owned here, still on the meta device) shares it
        again, so the skeleton counts the tensor once, as the whole model does."""
        if getattr(self.weights.config, "tie_word_embeddings", False) and other.weight.is_meta:
            other.weight = built.weight

    def rotary(self) -> nn.Module:
        """RoPE (no weights, an fp32 inv_freq buffer), shared by this rank's decoder stages."""
        if self._rotary is None:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            self._rotary = self.fused.rotary_emb = LlamaRotaryEmbedding(config=self.weights.config)
        return self._rotary


def _real_understanding(source: "StageSource") -> nn.Module:
    """The skeleton's VisionUnderstanding with real modules on the first stage: its vision
    tower and projector built from the VLM config (their buffers, such as position ids,
    are computed at construction and are not in the checkpoint) and every parameter read
    from the base, in the training dtype and frozen."""
    from megafusion.parallel.base_weights import UNDERSTANDING

    from transformers import AutoModel

    und = source.fused.understanding
    config = source.weights.vlm_config
    inner = und.vlm
    with torch.device("cpu"):
        inner.vision_tower = AutoModel.from_config(config.vision_config)
        inner.multi_modal_projector = type(inner.multi_modal_projector)(config)
    materialize(inner, UNDERSTANDING, source.weights, source.dtype)
    return und.requires_grad_(False)


def _mean_rows(weight: torch.Tensor) -> torch.Tensor:
    """The BOI/EOI rows' initial value, as LMFusionModel computes it: the mean row, in fp32."""
    return weight.float().mean(0, keepdim=True).repeat(NUM_IMAGE_TOKENS, 1)


class _Stage(nn.Module):
    def __init__(self, source: StageSource):
        super().__init__()
        # A plain attribute, not a submodule: stages must not own each other's weights.
        object.__setattr__(self, "fused", source.fused)

    def routing_and_layout(self, modality, document_ids, image_ids, dtype):
        """Routing and attention layout of a micro-batch, built once per stage: the
        decoder stages of one pipeline rank hand the very same tensors along, so the
        last result is reused while its inputs are the same objects (a FlexAttention
        BlockMask or a 4096x4096 mask is not rebuilt for every layer). The cache holds
        the key tensors, so their ids cannot be recycled while it does."""
        f = self.fused
        key = (modality, document_ids, image_ids)
        cached = getattr(f, "_pipeline_layout_cache", None)
        if cached is not None and all(a is b for a, b in zip(cached[0], key)):
            return cached[1]
        # dtype: the hidden states' (auto picks flash-attn only for fp16/bf16), as the
        # single-process forward does.
        backend = select_backend(f.attention_backend, modality.device, primitive=f.attention_primitive, dtype=dtype)
        value = (Routing.from_modality(modality),
                 AttentionLayout.build(document_ids, image_ids, backend, primitive=f.attention_primitive))
        object.__setattr__(f, "_pipeline_layout_cache", (key, value))
        return value


class EmbedStage(_Stage):
    def __init__(self, source: StageSource):
        super().__init__(source)
        f = self.fused
        raw = source.weights.get("model.embed_tokens.weight")
        f.embed_tokens.weight = nn.Parameter(raw.to(source.dtype), requires_grad=f.embed_tokens.weight.requires_grad)
        f.image_token_embed = nn.Parameter(_mean_rows(raw).to(source.dtype))
        del raw
        source.keep_tie(f.lm_head, f.embed_tokens)
        tok = f.image_tokenizer
        tok.build_side("embedder")
        self.embed_tokens = f.embed_tokens
        self.image_token_embed = f.image_token_embed
        self.embedder = source.cast(tok.embedder)
        self.vae = source.cast(tok.vae) if tok.vae is not None else None
        # A LLaVA base's understanding path feeds the embeddings: it lives on this stage.
        self.understanding = _real_understanding(source) if f.understanding is not None else None

    def forward(self, inputs):
        (input_ids, labels, modality, position_ids, document_ids, image_ids, img_bits, img_shape, t_bits, are_latents,
         vlm_bits, vlm_shape, vlm_sizes) = inputs
        f = self.fused
        device = self.embed_tokens.weight.device
        routing = Routing.from_modality(modality)
        empty = torch.empty(0, device=device)
        batch = PackedBatch(input_ids, labels, modality, position_ids, document_ids, image_ids,
                            images=empty, timesteps=empty, image_is_condition=empty)
        targets = f.lm_targets(batch)
        dtype = self.image_token_embed.dtype
        understood = None
        if self.understanding is not None and int(vlm_shape[0]):
            pixels = _from_bits(vlm_bits, torch.float32).view(*vlm_shape.tolist())
            understood = self.understanding(pixels, vlm_sizes if self.understanding.uses_image_sizes else None)
        parts = [f.embed(input_ids.reshape(-1)[routing.text_positions], understood)] if routing.n_text else []
        t = _from_bits(t_bits, torch.float32)
        if routing.n_image:
            x0 = _from_bits(img_bits, torch.float32).view(*img_shape.tolist()).to(dtype)
            if not bool(are_latents.item()):
                x0 = f.image_tokenizer.encode_images(x0).to(dtype)
            noise = torch.randn_like(x0)
            # The objective's own noising and target (no copy of the formulas here), so
            # the pipeline computes them exactly as the non-pipeline model does.
            x_t = f.objective.add_noise(x0, noise, t)
            tokens, _ = f.image_tokenizer.embed(x_t, t)
            parts.append(tokens.reshape(-1, tokens.shape[-1]).to(parts[0].dtype if parts else dtype))
            target = f.objective.target(x0, noise, t).float()
            if f.objective.velocity_needs_x_t:  # the last stage turns its output into a velocity at x_t
                target = torch.cat([target, x_t.float()], 1)
        else:
            target = torch.zeros(0, 1, 1, 1, device=device)
        h = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        position_ids = f.rope_positions(position_ids, image_ids)  # what every decoder stage's RoPE reads
        return (h, modality, position_ids, document_ids, image_ids, targets, _to_bits(target.contiguous()),
                torch.tensor(list(target.shape), dtype=torch.long, device=device), t_bits)


class DecoderStage(_Stage):
    def __init__(self, source: StageSource, index: int):
        super().__init__(source)
        layer = self.fused.layers[index]
        source.load(source.base.model.layers[index], f"model.layers.{index}.")  # the text tower's modules
        if "image" in layer._modules:  # every design but single_tower trains a copy of the text tower
            # Its norms as the whole model's image tower has them (model.fused_rmsnorm).
            layer.image = image_twin(layer.text, lambda text: copy.deepcopy(text).requires_grad_(True),
                                     lambda norm: image_norms(self.fused.cfg, norm))
        layer.make_scalars(dtype=source.dtype)  # X-Fusion's mix scalars and gate, at their starting values
        self.layer = layer
        self.rotary_emb = source.rotary()

    def forward(self, inputs):
        h, modality, position_ids, document_ids, image_ids, *rest = inputs
        routing, layout = self.routing_and_layout(modality, document_ids, image_ids, h.dtype)
        cos, sin = rope_cos_sin(self.rotary_emb, h, position_ids)  # [B, L] or image_rope=2d's [3, B, L]
        h = self.fused.run_layer(self.layer, h, routing, cos, sin, layout)
        return (h, modality, position_ids, document_ids, image_ids, *rest)


class HeadStage(_Stage):
    """Both losses; returns [total, lm, diffusion] (the engine's loss_fn takes [0])."""

    def __init__(self, source: StageSource):
        super().__init__(source)
        f = self.fused
        source.load(f.text_norm, "model.norm.")
        raw = source.weights.get("lm_head.weight")  # the embedding when tied
        f.lm_head.weight = nn.Parameter(raw.to(source.dtype), requires_grad=f.lm_head.weight.requires_grad)
        # LMFusionModel's BOI/EOI logit rows start at the mean row of the output matrix
        # (the embedding's when tied).
        self.image_token_head = nn.Parameter(_mean_rows(raw).to(source.dtype))
        if not f.tied_embeddings:  # the skeleton's own BOI/EOI logit rows are these
            f.image_token_head = self.image_token_head
        del raw
        source.keep_tie(f.embed_tokens, f.lm_head)
        f.image_norm = image_norms(f.cfg, copy.deepcopy(f.text_norm).requires_grad_(True))
        f.image_tokenizer.build_side("predictor")
        self.text_norm = f.text_norm
        self.lm_head = f.lm_head
        self.image_norm = f.image_norm
        self.predictor = source.cast(f.image_tokenizer.predictor)

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
            context = (prompt_vectors(h, routing, n_img, f.tokens_per_image, self.text_norm)
                       if f.cfg.prompt_context else None)
            pred = self.predictor(hi, t, context)
            if f.objective.velocity_needs_x_t:
                target, x_t = target.chunk(2, dim=1)
                pred = f.objective.velocity(pred, x_t, t)
            noised = t > 0
            if bool(noised.any()):
                diff = F.mse_loss(pred[noised].float(), target[noised])
        total = f.cfg.lm_loss_weight * lm + f.cfg.diffusion_loss_weight * diff
        out = torch.stack([total, lm.detach(), diff.detach()])
        if hasattr(self, "records"):
            self.records.append(out.detach())
        return out


def layer_specs(source: StageSource) -> list:
    from deepspeed.pipe import LayerSpec

    n = source.weights.config.num_hidden_layers
    return ([LayerSpec(EmbedStage, source)] + [LayerSpec(DecoderStage, source, i) for i in range(n)]
            + [LayerSpec(HeadStage, source)])


def build_pipeline_module(source: StageSource, world_size: int):
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import ProcessTopology

    P = source.cfg.parallel.pipeline_stages
    if world_size % P:
        raise SystemExit(f"error: parallel.pipeline_stages={P} does not divide the world size {world_size}")
    topo = ProcessTopology(axes=["data", "pipe"], dims=[world_size // P, P])
    module = PipelineModule(layers=layer_specs(source), topology=topo, loss_fn=lambda out, _labels: out[0],
                            partition_method="type:DecoderStage", dynamic_shape=True)
    f = source.fused
    module.tokens_per_image = f.tokens_per_image
    module.llama_config = f.llama_config
    # parameter_groups gives text-tower parameters train.text_lr (train_text_tower runs).
    text_ids = {id(p) for m in f.text_tower_modules() for p in m.parameters()}
    names = {n for n, p in module.named_parameters() if id(p) in text_ids}
    module.text_tower_parameter_names = lambda: names
    return module


def initialize_pipeline(cfg: RunConfig, ds_config: dict):
    """(the fused skeleton, engine, optimizer, scheduler). The skeleton holds this rank's
    stage modules with real tensors and everything else on the meta device; it answers
    what the trainer asks of the model (tokens_per_image, vocab_size, parameter counts)."""
    import deepspeed
    import torch.distributed as dist

    from megafusion.parallel.engine import build_optimizer, build_scheduler, parameter_groups

    if (ds_config.get("pipeline") or {}).get("activation_checkpoint_interval", 0):
        raise SystemExit("error: the DeepSpeed config sets pipeline.activation_checkpoint_interval; set "
                         "model.activation_checkpointing=true instead (the decoder stages recompute each layer)")
    source = StageSource(cfg)
    module = build_pipeline_module(source, dist.get_world_size())
    optimizer = build_optimizer(parameter_groups(module, cfg), cfg, ds_config)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer,
                                                           lr_scheduler=build_scheduler(cfg), config=ds_config)
    return source.fused, engine, optimizer, scheduler
