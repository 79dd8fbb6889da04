"""The fused model: a frozen text-only Llama (the text tower) plus trainable image modules,
one attention layout over all tokens with the hybrid mask, and the image tokenizer and
diffusion objective around the decoder stack.

What a decoder layer does with its towers is the design, model.tower_mode: LMFusion's
per-modality q/k/v/o, MLP and norms by default, or one of X-Fusion's (one file each,
megafusion/model/layer_*.py). This class keeps what every design shares. The text tower
*is* the base model's modules (same objects, frozen), so text-only input reproduces the
base model's computation exactly wherever the design keeps the text path frozen. The
trainable towers start as deep copies.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .align import FeatureAligner, to_grid
from .attention import AttentionLayout, select_backend
from .batch import IGNORE_INDEX, PackedBatch
from .config import FusionConfig
from .diffusion import make_objective
from .fused_norm import image_norms
from .image_io import ImageTokenizer
from .image_rope import rope_cos_sin, rope_positions
from .layers import make_layer
from .routing import Routing, prompt_vectors
from .towers import DecoderLayer, HeadShape

NUM_IMAGE_TOKENS = 2  # begin-of-image, end-of-image


@dataclass
class FusionOutput(ModelOutput):
    """A dict subclass (transformers' ModelOutput): DeepSpeed's ZeRO-3 finds the tensors
    in dicts, tuples and lists only, and needs them to re-gather parameters for backward."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    diffusion_loss: torch.Tensor | None = None
    n_text_targets: int | None = None
    # The LM loss over targets that follow an image of their own document (captioning,
    # the part of the LM loss the image tower can lower; the rest is the frozen text
    # tower's), and how many such targets there were. NaN when there were none.
    caption_loss: torch.Tensor | None = None
    n_caption_targets: int | None = None
    n_noised_images: int | None = None
    align_loss: torch.Tensor | None = None  # model.align_encoder runs only
    logits: torch.Tensor | None = None  # [B, L, V+2] at text positions (0 at image positions)
    image_prediction: torch.Tensor | None = None  # [N, C, h, w]
    noisy_images: torch.Tensor | None = None


class LMFusionModel(nn.Module):
    def __init__(self, base_model, cfg: FusionConfig, clone=None, gather=None, image_tokenizer=None,
                 understanding=None):
        """base_model: a transformers LlamaForCausalLM whose modules become the text tower.
        understanding: a LLaVA base's frozen vision encoder and projector
        (megafusion/model/vlm.py), or None for a text-only base.

        clone(module) makes an image-tower twin of a text-tower module and gather(params)
        is a context in which partitioned parameters are whole; the defaults (deepcopy,
        nothing to gather) are for unpartitioned models, megafusion/parallel supplies
        ZeRO-3 versions. image_tokenizer: one built by the caller (pipeline stages build
        its sides separately); by default both sides are built here."""
        super().__init__()
        clone = clone or copy.deepcopy
        gather = gather or (lambda params: contextlib.nullcontext())
        cfg.validate()
        self.cfg = cfg
        self.llama_config = lc = base_model.config
        inner = base_model.model
        self.vocab_size = lc.vocab_size
        self.boi_id, self.eoi_id = self.vocab_size, self.vocab_size + 1
        hidden = lc.hidden_size
        head_dim = getattr(lc, "head_dim", None) or hidden // lc.num_attention_heads

        self.embed_tokens = inner.embed_tokens
        heads = HeadShape(lc.num_attention_heads, lc.num_key_value_heads, head_dim)
        self.layers = nn.ModuleList(
            make_layer(cfg.tower_mode, layer, heads, clone, lambda norm: image_norms(cfg, norm)) for layer in inner.layers
        )
        self.text_norm = inner.norm
        # The image tokens' final norm, a trainable copy in every design (single_tower too:
        # it belongs to the image output path, like the patch embedding).
        self.image_norm = image_norms(cfg, clone(inner.norm))
        self.lm_head = base_model.lm_head
        self.rotary_emb = inner.rotary_emb
        # New rows for BOI/EOI live beside the frozen vocabulary rather than in a resized
        # matrix, so the frozen rows stay bitwise untouched and need no gradient mask.
        # Initialised at the mean embedding (a common, stable choice for new tokens).
        with torch.no_grad(), gather([self.embed_tokens.weight]):
            mean = self.embed_tokens.weight.float().mean(0, keepdim=True).to(self.embed_tokens.weight.dtype)
        self.image_token_embed = nn.Parameter(mean.repeat(NUM_IMAGE_TOKENS, 1).clone())
        self.tied_embeddings = bool(getattr(lc, "tie_word_embeddings", False))
        if not self.tied_embeddings:
            with torch.no_grad(), gather([self.lm_head.weight]):
                head_mean = self.lm_head.weight.float().mean(0, keepdim=True).to(self.lm_head.weight.dtype)
            self.image_token_head = nn.Parameter(head_mean.repeat(NUM_IMAGE_TOKENS, 1).clone())

        self.image_tokenizer = image_tokenizer if image_tokenizer is not None else ImageTokenizer(cfg, hidden)
        self.aligner = None
        if cfg.align_encoder:
            if not 1 <= cfg.align_layer <= len(self.layers):
                raise ValueError(f"model.align_layer={cfg.align_layer}: the base has decoder layers 1..{len(self.layers)}")
            self.aligner = FeatureAligner(cfg, hidden)
        self.understanding = understanding
        self.objective = make_objective(cfg)
        self.attention_backend = cfg.attention_backend
        self.attention_primitive = None  # test hook: flash decomposition with a stand-in
        self.set_text_tower_trainable(cfg.train_text_tower)

    # -- parameters -------------------------------------------------------------
    def text_tower_modules(self):
        yield self.embed_tokens
        yield self.text_norm
        yield self.lm_head
        for layer in self.layers:
            yield layer.text

    def set_text_tower_trainable(self, trainable: bool) -> None:
        for m in self.text_tower_modules():
            for p in m.parameters():
                p.requires_grad_(trainable)
        if self.image_tokenizer.vae is not None:
            self.image_tokenizer.vae.requires_grad_(False)

    def untie_image_token_head(self) -> None:
        """Give the BOI/EOI logit rows their own parameter, image_token_head, when they are
        the embedding rows (a base with tied embeddings). The pipeline's HeadStage trains
        such a copy (megafusion/parallel/pipeline.py), which an exported pipeline
        checkpoint keeps; afterwards tied_embeddings is False and logits() uses the copy."""
        if not self.tied_embeddings:
            return
        self.image_token_head = nn.Parameter(self.image_token_embed.detach().clone(),
                                             requires_grad=self.image_token_embed.requires_grad)
        self.tied_embeddings = False

    def text_tower_parameter_names(self) -> set[str]:
        ids = {id(p) for m in self.text_tower_modules() for p in m.parameters()}
        return {n for n, p in self.named_parameters() if id(p) in ids}

    @property
    def tokens_per_image(self) -> int:
        return self.image_tokenizer.tokens_per_image

    # -- pieces -----------------------------------------------------------------
    def embed(self, ids: torch.Tensor, understood: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings of text ids [T]; with a LLaVA base, the rows of its image
        placeholder tokens are the understood images' features [n, D] (in order)."""
        base = self.embed_tokens(ids.clamp(max=self.vocab_size - 1))
        is_new = ids >= self.vocab_size
        # Always through torch.where, even without BOI/EOI here: the new rows then get a
        # (zero) gradient on every rank, as ZeRO-3's gradient reduction expects.
        new = self.image_token_embed[(ids - self.vocab_size).clamp(min=0, max=NUM_IMAGE_TOKENS - 1)]
        out = torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)
        if self.understanding is not None:
            out = self.understanding.place(ids, out, understood)
        return out

    def understood_features(self, batch) -> torch.Tensor | None:
        """The features of the batch's images to be understood through a LLaVA base's own
        path (None without them). A batch with none still runs the encoder on a blank
        image when the model has one: under ZeRO-3 every rank gathers its parameters."""
        if self.understanding is None:
            return None
        device = self.image_token_embed.device  # not embed_tokens' (see forward)
        pixels = getattr(batch, "vlm_pixel_values", None)
        if pixels is None or pixels.shape[0] == 0:
            if bool((batch.input_ids == self.understanding.image_token_id).any()):
                raise ValueError(f"the batch has image placeholder tokens (id {self.understanding.image_token_id}) "
                                 "but no pixels to understand (vlm_pixel_values)")
            self.understanding.blank(device)
            return None
        sizes = batch.vlm_image_sizes.to(device) if batch.vlm_image_sizes is not None else None
        return self.understanding(pixels.to(device), sizes)

    def logits(self, h_text: torch.Tensor) -> torch.Tensor:
        """Logits over the base vocabulary plus BOI/EOI; the first V columns are the base
        model's own logits."""
        head_new = self.image_token_embed if self.tied_embeddings else self.image_token_head
        return torch.cat([self.lm_head(h_text), h_text @ head_new.to(h_text.dtype).t()], dim=-1)

    def rope_positions(self, position_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        """The RoPE positions the layers see (model.image_rope; image_rope.py): [B, L],
        or [3, B, L] for 2d; rope_cos_sin reads either."""
        return rope_positions(position_ids, image_ids, self.cfg.image_rope, self.image_tokenizer.grid[1])

    def lm_targets(self, batch: PackedBatch) -> torch.Tensor:
        """[B, L]: the token position i must predict, -100 where there is no loss.

        Position i predicts labels[i+1] when i and i+1 are text in the same document.
        The begin-of-image token is not a target unless cfg.lm_loss_on_boi (Transfusion);
        image positions never predict anything (the end-of-image token follows an image
        deterministically)."""
        labels = batch.labels
        nxt = torch.full_like(labels, IGNORE_INDEX)
        nxt[:, :-1] = labels[:, 1:]
        same_doc = torch.zeros_like(labels, dtype=torch.bool)
        same_doc[:, :-1] = batch.document_ids[:, 1:] == batch.document_ids[:, :-1]
        ok = same_doc & (batch.modality == 0)
        ok[:, :-1] &= batch.modality[:, 1:] == 0
        if not self.cfg.lm_loss_on_boi:
            ok &= nxt != self.boi_id
        return torch.where(ok, nxt, torch.full_like(nxt, IGNORE_INDEX))

    @staticmethod
    def after_image(batch: PackedBatch) -> torch.Tensor:
        """[B, L] bool: an image of the same document comes before this position."""
        B, L = batch.modality.shape
        pos = torch.arange(L, device=batch.modality.device).expand(B, L)
        last_image = torch.where(batch.modality != 0, pos, torch.full_like(pos, -1)).cummax(1).values
        last_image = torch.cat([torch.full_like(last_image[:, :1], -1), last_image[:, :-1]], 1)  # strictly before
        starts = torch.ones_like(batch.modality, dtype=torch.bool)
        starts[:, 1:] = batch.document_ids[:, 1:] != batch.document_ids[:, :-1]
        doc_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
        return last_image >= doc_start

    def run_layer(self, layer: DecoderLayer, h, routing, cos, sin, layout):
        """One decoder layer; with cfg.activation_checkpointing (and the layer training)
        only its inputs are kept and it runs again in backward. Pipeline stages call this
        too, so both paths recompute the same way."""
        if self.cfg.activation_checkpointing and layer.training and torch.is_grad_enabled():
            return checkpoint(layer, h, routing, cos, sin, layout, True, use_reentrant=False)
        return layer(h, routing, cos, sin, layout)

    def _run_layers(self, h, routing, cos, sin, layout, kept: dict | None = None):
        """The decoder stack; kept["align"] gets the hidden states after layer
        cfg.align_layer when the model aligns features."""
        for i, layer in enumerate(self.layers):
            h = self.run_layer(layer, h, routing, cos, sin, layout)
            if kept is not None and i + 1 == self.cfg.align_layer:
                kept["align"] = h
        return h

    # -- forward ----------------------------------------------------------------
    def forward(self, batch: PackedBatch, noise: torch.Tensor | None = None, return_logits: bool = False) -> FusionOutput:
        # Device and dtype from this module's own parameter, never from a child's: under
        # ZeRO-3 reading a child's parameter during the forward pass gathers it and keeps
        # it gathered until this module's backward ends (DeepSpeed's ZeROOrderedDict
        # registers it as an external parameter of the running module), which for
        # embed_tokens.weight would hold the whole vocabulary matrix all step.
        device = self.image_token_embed.device
        dtype = self.image_token_embed.dtype
        routing = Routing.from_modality(batch.modality)
        # The hidden states (hence q/k/v) are in the model's dtype: "auto" picks
        # flash-attn only where it has kernels (fp16/bf16), and an explicit flash with
        # fp32 fails here in one line rather than inside flash-attn.
        backend = select_backend(self.attention_backend, device, primitive=self.attention_primitive, dtype=dtype)
        layout = AttentionLayout.build(batch.document_ids, batch.image_ids, backend, primitive=self.attention_primitive)

        # Both modalities' modules run even when this batch has none of one (on zero
        # rows, see Routing.run), and every trainable parameter ends up in the loss's
        # graph (with a zero weight where it has nothing to learn from): under ZeRO-3 the
        # ranks gather parameters and reduce gradients collectively, so a rank whose
        # batch is text-only must still take part in the image modules' collectives.
        text_pos = routing.text_positions
        h_text_in = self.embed(batch.input_ids.reshape(-1)[text_pos], self.understood_features(batch))

        n_images = batch.images.shape[0]
        if routing.n_image != n_images * self.tokens_per_image:
            raise ValueError(
                f"batch has {routing.n_image} image positions but {n_images} images x {self.tokens_per_image} tokens per image"
            )
        x0 = batch.images.to(device=device, dtype=dtype)
        if not batch.images_are_latents:
            x0 = self.image_tokenizer.encode_images(x0).to(dtype)
        if x0.shape[0] == 0:
            x0 = x0.new_zeros((0, *self.image_tokenizer.latent_shape))
        if noise is None:
            noise = torch.randn_like(x0)
        t = batch.timesteps.to(device).reshape(n_images)
        x_t = self.objective.add_noise(x0, noise, t)
        img_tokens, aux = self.image_tokenizer.embed(x_t, t)
        h = torch.cat([h_text_in, img_tokens.reshape(-1, img_tokens.shape[-1]).to(h_text_in.dtype)], 0)

        cos, sin = rope_cos_sin(self.rotary_emb, h, self.rope_positions(batch.position_ids, batch.image_ids).to(device))
        kept = {} if self.aligner is not None else None
        h = self._run_layers(h, routing, cos, sin, layout, kept)

        h_text = self.text_norm(h[: routing.n_text])
        targets = self.lm_targets(batch).reshape(-1)[text_pos].to(device)
        sel = targets != IGNORE_INDEX
        n_targets = int(sel.sum())
        # Logits only where there is a target: the LM head is the largest matmul of a
        # small model and most packed positions have no text target.
        target_logits = self.logits(h_text[sel]).float()
        lm_loss = F.cross_entropy(target_logits, targets[sel]) if n_targets else target_logits.sum() * 0.0
        with torch.no_grad():
            captioned = self.after_image(batch).reshape(-1)[text_pos].to(device)[sel]
            n_caption = int(captioned.sum())
            caption_loss = (F.cross_entropy(target_logits[captioned], targets[sel][captioned]) if n_caption
                            else torch.tensor(float("nan"), device=device))
        logits = None
        if return_logits:
            full = self.logits(h_text)
            logits = full.new_zeros(routing.n_tokens, full.shape[-1])
            logits[text_pos] = full
            logits = logits.view(routing.batch_size, routing.seq_len, -1)

        h_img = self.image_norm(h[routing.n_text:]).view(n_images, self.tokens_per_image, h.shape[-1])
        context = (prompt_vectors(h, routing, n_images, self.tokens_per_image, self.text_norm)
                   if self.cfg.prompt_context else None)
        pred = self.objective.velocity(self.image_tokenizer.predict(h_img, aux, context), x_t, t)
        # A clean image (t == 0, a condition for understanding) has no noise to predict;
        # only noised images carry the diffusion loss.
        noised = t > 0
        n_noised = int(noised.sum())
        if n_noised:
            diffusion_loss = self.objective.loss(pred[noised], x0[noised], noise[noised], t[noised])
        else:
            diffusion_loss = pred.sum() * 0.0
        if not n_images:
            pred = x_t = None

        loss = self.cfg.lm_loss_weight * lm_loss + self.cfg.diffusion_loss_weight * diffusion_loss
        align_loss = None
        if self.aligner is not None:
            align_loss = self._align_loss(kept["align"][routing.n_text:], batch, x0, n_images)
            loss = loss + self.cfg.align_weight * align_loss
        return FusionOutput(
            loss=loss,
            lm_loss=lm_loss.detach(),
            diffusion_loss=diffusion_loss.detach(),
            n_text_targets=n_targets,
            caption_loss=caption_loss,
            n_caption_targets=n_caption,
            n_noised_images=n_noised,
            align_loss=None if align_loss is None else align_loss.detach(),
            logits=logits,
            image_prediction=pred,
            noisy_images=x_t,
        )

    def _align_loss(self, h_image: torch.Tensor, batch: PackedBatch, x0: torch.Tensor, n_images: int) -> torch.Tensor:
        """The feature-alignment loss of the image tokens' hidden states at the align
        layer (megafusion/model/align.py). Targets: the batch's pre-encoded features, else
        the frozen encoder run on the clean images (pixel batches as they are, latent ones
        through the VAE's decoder). Without pre-encoded features a batch without images
        still runs the encoder (on one blank image, decoded by the VAE as a latent batch's
        are), and the projection always runs (on zero rows): under ZeRO-3 every rank
        gathers their parameters collectively."""
        grid = self.image_tokenizer.grid
        device = h_image.device
        if batch.align_features is not None:
            if batch.align_features.shape[-1] != self.aligner.encoder.dim:
                raise ValueError(f"the batch's align_features have width {batch.align_features.shape[-1]}, "
                                 f"model.align_encoder's features {self.aligner.encoder.dim}: shards written with "
                                 "another --align-encoder")
            targets = to_grid(batch.align_features.to(device), grid)
        elif n_images == 0:
            # One blank image through the modules an image batch runs, the VAE's decoder
            # included when the images are latents; its features are dropped.
            if batch.images_are_latents:
                blank = self.image_tokenizer.decode_latents(x0.new_zeros((1, *self.image_tokenizer.latent_shape)))
            else:
                blank = torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size, device=device)
            self.aligner.encoder(blank)
            targets = None
        else:
            pixels = batch.images.to(device) if not batch.images_are_latents else self.image_tokenizer.decode_latents(x0)
            targets = self.aligner.targets(pixels, grid)
        if n_images == 0:
            return self.aligner.proj(h_image).sum() * 0.0
        return self.aligner.loss(h_image.view(n_images, self.tokens_per_image, -1), targets)

    @classmethod
    def from_base(cls, base: str, cfg: FusionConfig, dtype: torch.dtype = torch.float32) -> "LMFusionModel":
        from .loading import load_base

        text, understanding = load_base(base, dtype=dtype)
        return cls(text, cfg, understanding=understanding)
