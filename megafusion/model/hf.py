"""The fused model as a Hugging Face model: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` on a directory written by tools/convert_to_hf.py.

tools/convert_to_hf.py copies this file and its siblings in megafusion/model/ flat into
the export directory, so the code that runs there is the code the trainer runs. For that
these files import each other relatively and nothing from deepspeed or from megafusion
outside model/. transformers' remote-code loader copies, for a local directory, only the
files the entry module (this one) imports directly with `from .x import` lines: hence one
such line per sibling below, even where nothing from it is used here (the exporter checks
that this list covers every module the others import).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    model(input_ids).logits            # [B, L, V + 2]: the base model's V logits, then BOI, EOI
    model.generate(input_ids)          # text only (BOI/EOI suppressed): the base model's output
    model.generate_images(prompt_ids)  # pixels in [-1, 1], by the model's diffusion sampler
    model.caption_images(pixels)       # token ids
    model.caption_with_vlm(ids, pixel_values)  # a LLaVA base's own captioning (LLaVAFusion)
    model.model                        # the LMFusionModel; model.model(PackedBatch) is the training forward
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .align import FeatureAligner  # noqa: F401  (see the module docstring)
from .attention import hybrid_mask  # noqa: F401
from .batch import TEXT, PackedBatch  # noqa: F401
from .config import FusionConfig
from .diffusion import make_sampler_scheduler  # noqa: F401
from .fused_norm import image_norms  # noqa: F401
from .fusion import LMFusionModel
from .image_io import ImageTokenizer  # noqa: F401
from .image_rope import rope_cos_sin  # noqa: F401
from .inference import KVCache  # noqa: F401
from .layer_dual_tower import DualTowerLayer  # noqa: F401
from .layer_gated_tower import GatedTowerLayer  # noqa: F401
from .layer_lmfusion import LMFusionLayer  # noqa: F401
from .layer_single_tower import SingleTowerLayer  # noqa: F401
from .layer_xfuse import XFuseLayer  # noqa: F401
from .layers import LAYER_CLASSES
from .loading import BaseModelError  # noqa: F401
from .patchers import ImageBlocks  # noqa: F401
from .routing import Routing
from .tasks import image_to_text, interleave, text_to_image, vlm_image_to_text
from .towers import DecoderLayer  # noqa: F401
from .vlm import split_vlm, vlm_from_config

MODEL_TYPE = "megafusion"
VAE_SUBFOLDER = "vae"


class MegafusionConfig(PretrainedConfig):
    """base_config: the base LlamaConfig as a dict; fusion: FusionConfig's fields (vae_path
    relative to the model directory). vocab_size is the base vocabulary + BOI, EOI."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: Optional[dict] = None, fusion: Optional[dict] = None,
                 untied_image_token_head: bool = False, boi_token_id: Optional[int] = None,
                 eoi_token_id: Optional[int] = None, use_cache: bool = True, vlm_config: Optional[dict] = None,
                 **kwargs):
        base_config = dict(base_config or {})
        # A LLaVA base's whole config (LLaVAFusion): its vision encoder and projector are
        # part of the model; base_config is then its language model's.
        self.vlm_config = dict(vlm_config) if vlm_config else None
        self.use_cache = use_cache
        self.base_config = base_config
        self.fusion = dict(fusion or {})
        self.untied_image_token_head = bool(untied_image_token_head)
        base_vocab = int(base_config.get("vocab_size", 0))
        self.boi_token_id = base_vocab if boi_token_id is None else int(boi_token_id)
        self.eoi_token_id = base_vocab + 1 if eoi_token_id is None else int(eoi_token_id)
        # Mirrored for transformers' utilities (caches, device maps) that read them here.
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "max_position_embeddings", "rms_norm_eps"):
            if key in base_config:
                kwargs.setdefault(key, base_config[key])
        kwargs.setdefault("tie_word_embeddings", bool(base_config.get("tie_word_embeddings", False)))
        kwargs["vocab_size"] = base_vocab + 2
        super().__init__(**kwargs)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(**{k: v for k, v in self.base_config.items() if k not in ("architectures", "transformers_version")})

    # Not named fusion_config: transformers 5's from_pretrained reads a config attribute of
    # that name as its own kernel-fusion settings (a mapping) and fails on a method
    # ("'function' object has no attribute 'items'").
    def fused_model_config(self) -> FusionConfig:
        fields = dict(self.fusion)
        if "unet_channels" in fields:
            fields["unet_channels"] = tuple(fields["unet_channels"])
        if fields.get("image_mode") == "vae":
            fields["vae_path"] = _resolve_vae(self.name_or_path, fields.get("vae_path") or VAE_SUBFOLDER)
        return FusionConfig(**fields)


def _resolve_vae(model_dir: str, vae_path: str) -> str:
    """The VAE directory of an exported model: vae_path relative to the model directory
    (a local directory, or a Hub repository through transformers' file cache)."""
    if os.path.isabs(vae_path):
        return vae_path
    if model_dir and os.path.isdir(model_dir):
        return os.path.join(model_dir, vae_path)
    if model_dir:
        from transformers.utils import cached_file

        config_file = cached_file(model_dir, "config.json", subfolder=vae_path)
        cached_file(model_dir, "diffusion_pytorch_model.safetensors", subfolder=vae_path)
        return os.path.dirname(config_file)
    return vae_path


class LMFusionForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MegafusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [cls.__name__ for cls in LAYER_CLASSES.values()]
    # The frozen VAE is a diffusers model of its own (DIR/vae), loaded at construction.
    _keys_to_ignore_on_load_missing = [r"image_tokenizer\.vae\."]
    # {tied: source}: transformers 5 requires the mapping (a list fails in
    # get_expanded_tied_weights_keys: 'list' object has no attribute 'keys'); 4.x iterates
    # it, i.e. its keys, as it did the list.
    _tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
    _supports_sdpa = True

    def __init__(self, config: MegafusionConfig, fused: Optional[LMFusionModel] = None):
        super().__init__(config)
        if fused is None:
            understanding = None
            if config.vlm_config:
                base, understanding = split_vlm(vlm_from_config(config.vlm_config))
            else:
                base = LlamaForCausalLM(config.llama_config())
            fused = LMFusionModel(base, config.fused_model_config(), understanding=understanding)
            if config.untied_image_token_head:
                fused.untie_image_token_head()
        self.model = fused
        self._keys_to_ignore_on_save = [k for k in self.state_dict() if ".image_tokenizer.vae." in k]
        self.post_init()

    def _init_weights(self, module):
        # Every weight comes from the checkpoint (or from the base model and the image
        # tokenizer's own initialisation when built directly).
        pass

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, and in VAE mode the VAE (left out of the model's
        safetensors) into save_directory/vae in fp32, where config.json's fusion.vae_path
        points: the saved directory loads as the export it came from did. The VAE is
        written first, so that push_to_hub=True uploads it with the rest."""
        vae = self.model.image_tokenizer.vae
        if vae is not None and kwargs.get("is_main_process", True):
            import copy

            os.makedirs(save_directory, exist_ok=True)
            copy.deepcopy(vae).to(torch.float32).save_pretrained(os.path.join(save_directory, VAE_SUBFOLDER),
                                                                 safe_serialization=True)
        fusion = self.config.fusion
        if vae is not None and fusion.get("vae_path") != VAE_SUBFOLDER:
            self.config.fusion = dict(fusion, vae_path=VAE_SUBFOLDER)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.fusion = fusion

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    # -- transformers' interface: text ------------------------------------------------
    def forward(self, input_ids: torch.LongTensor = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values=None, inputs_embeds=None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                cache_position=None, logits_to_keep: int = 0, return_dict: Optional[bool] = None, **kwargs):
        """Token ids (text, BOI and EOI; images go through generate_images / the
        training forward) -> logits [B, L, V + 2], with a transformers Cache."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("LMFusionForCausalLM.forward takes input_ids (inputs_embeds is not supported)")
        fused = self.model
        B, L = input_ids.shape
        device = input_ids.device
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        P = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + L, dtype=torch.long, device=device)
        valid = attention_mask.bool()
        if position_ids is None:
            position_ids = (valid.long().cumsum(1) - 1).clamp_min(0)[:, -L:]
        q_index = torch.arange(P, P + L, device=device)[:, None]
        k_index = torch.arange(P + L, device=device)[None, :]
        mask = ((k_index <= q_index)[None] & valid[:, None, :]) | (k_index == q_index)[None]
        routing = Routing.from_modality(torch.full((B, L), TEXT, dtype=torch.long, device=device))
        h = fused.embed(input_ids.reshape(-1))
        cos, sin = fused.rotary_emb(h, position_ids)
        for i, layer in enumerate(fused.layers):
            if past_key_values is not None:
                def kv_update(k, v, i=i):
                    return past_key_values.update(k, v, i)
            else:
                def kv_update(k, v):
                    return k, v
            h = layer.forward_cached(h, routing, cos, sin, mask[:, None], kv_update)
        h = h.view(B, L, -1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = fused.logits(fused.text_norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    # -- images -----------------------------------------------------------------------
    def _ids(self):
        c = self.config
        return c.bos_token_id, c.eos_token_id, c.boi_token_id, c.eoi_token_id

    def _sampler_defaults(self, steps, guidance_scale):
        g = self.generation_config
        steps = steps if steps is not None else getattr(g, "image_num_inference_steps", 50)
        guidance_scale = guidance_scale if guidance_scale is not None else getattr(g, "image_guidance_scale", 3.0)
        return int(steps), float(guidance_scale)

    @torch.no_grad()
    def generate_images(self, prompt_ids: Sequence[Sequence[int]], num_images_per_prompt: int = 1,
                        num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                        generator: Optional[torch.Generator] = None, progress: Callable = lambda it: it) -> torch.Tensor:
        """Text to image: caption token ids (without BOS) -> pixels [N, 3, H, W] in [-1, 1]."""
        bos, _, boi, _ = self._ids()
        steps, cfg = self._sampler_defaults(num_inference_steps, guidance_scale)
        latents = text_to_image(self.model, prompt_ids, bos=bos, boi=boi, num_images=num_images_per_prompt,
                                steps=steps, guidance_scale=cfg, generator=generator, progress=progress)
        return self.model.image_tokenizer.decode_latents(latents.to(self.model.image_token_embed.dtype)).float().clamp(-1, 1)

    @torch.no_grad()
    def caption_images(self, pixels: torch.Tensor, max_new_tokens: int = 64, **kwargs) -> list:
        """Image to text: pixels [N, 3, H, W] in [-1, 1] -> token ids per image (no EOS)."""
        bos, eos, boi, eoi = self._ids()
        fused = self.model
        latents = fused.image_tokenizer.encode_images(pixels.to(fused.image_token_embed))
        return image_to_text(fused, latents, bos=bos, boi=boi, eoi=eoi, eos=eos, max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def caption_with_vlm(self, input_ids: Sequence[Sequence[int]], pixel_values: torch.Tensor,
                         image_sizes: Optional[torch.Tensor] = None, max_new_tokens: int = 64, **kwargs) -> list:
        """Image to text through a LLaVA base's own understanding path (LLaVAFusion):
        input_ids as the export's processor writes them (placeholders expanded, one list
        per row, no padding), its pixel_values (and image_sizes) -> new token ids per row."""
        _, eos, boi, eoi = self._ids()
        return vlm_image_to_text(self.model, input_ids, pixel_values, image_sizes, eos=eos, banned=(boi, eoi),
                                 max_new_tokens=max_new_tokens, **kwargs)

    @torch.no_grad()
    def interleave(self, prompt_ids: Sequence[int], num_inference_steps: Optional[int] = None,
                   guidance_scale: Optional[float] = None, **kwargs) -> list:
        """Text and images: segments of token ids and pixel tensors [3, H, W] in [-1, 1]."""
        bos, eos, boi, eoi = self._ids()
        steps, cfg = self._sampler_defaults(num_inference_steps, guidance_scale)
        head = [bos] if bos is not None else []
        fused = self.model
        segments = interleave(fused, head + list(prompt_ids), boi=boi, eoi=eoi, eos=eos, uncond_ids=head + [boi],
                              steps=steps, guidance_scale=cfg, **kwargs)
        return [fused.image_tokenizer.decode_latents(s[None].to(fused.image_token_embed.dtype))[0].float().clamp(-1, 1)
                if isinstance(s, torch.Tensor) else s for s in segments]


MegafusionConfig.register_for_auto_class()
LMFusionForCausalLM.register_for_auto_class("AutoModelForCausalLM")
