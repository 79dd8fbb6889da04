"""LLaVAFusion: the understanding path of a LLaVA-family base (LMFusion, section 5).

A vision-language base keeps its whole understanding path frozen: an image to be
understood enters the sequence as the VLM's own projected vision features, at the
positions of its image placeholder tokens, and the frozen text tower reads them as the
VLM does (causally, as text). Images to be generated still go through the trainable
image tower as VAE latents. Because the features come from the base's own
get_image_features (vision tower, feature layer and selection, projector, and for
LLaVA-NeXT its anyres tiling and image_newline), megafusion's logits on image + text
equal the VLM's: understanding is untouched by construction.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .patchers import weight_dtype


def vlm_from_config(config_dict: dict):
    """A LLaVA-family model built from its config (as an export stores it), weights uninitialised
    where the caller's context says so (from_pretrained: the meta device)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    fields = dict(config_dict)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForImageTextToText.from_config(config)


def split_vlm(vlm):
    """(text LlamaForCausalLM, VisionUnderstanding) sharing the VLM's own modules.

    The LlamaForCausalLM is built on the meta device (no memory) and given the VLM's
    language model and head, so the text tower is exactly the VLM's; the language model
    is then detached from the VLM's inner model, so that no module is held twice."""
    from transformers import LlamaForCausalLM

    inner = vlm.model
    with torch.device("meta"):
        text = LlamaForCausalLM(vlm.config.text_config)
    text.model = inner.language_model
    text.lm_head = vlm.lm_head
    del inner.language_model
    return text, VisionUnderstanding(inner, vlm.config)


class VisionUnderstanding(nn.Module):
    """The VLM's vision encoder and projector (its inner model without the language
    model), frozen. forward gives the features of a batch of images, one row per
    placeholder token, in the order the placeholders appear."""

    def __init__(self, inner: nn.Module, config):
        super().__init__()
        self.vlm = inner
        self.vlm_config = config  # the whole VLM config: an export rebuilds this module from it
        self.model_type = config.model_type
        self.image_token_id = int(config.image_token_index)
        self.image_size = int(config.vision_config.image_size)
        self.grid_pinpoints = getattr(config, "image_grid_pinpoints", None)
        self.requires_grad_(False)

    @property
    def uses_image_sizes(self) -> bool:
        return self.model_type == "llava_next"

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values as the base's processor gives them (LLaVA [N, C, H, W]; LLaVA-NeXT
        [N, crops, C, H, W] padded to the batch's most crops, or every image's own crops
        concatenated [sum crops, C, H, W], with image_sizes [N, 2]: the base's
        get_image_features drops the padding) -> [placeholder tokens, D]."""
        dtype = weight_dtype(self.vlm.multi_modal_projector)
        pixel_values = pixel_values.to(dtype)
        if self.uses_image_sizes:
            if image_sizes is None:
                raise ValueError(f"a {self.model_type} base needs each understood image's size (image_sizes)")
            features = self.vlm.get_image_features(pixel_values, image_sizes)
        else:
            features = self.vlm.get_image_features(pixel_values)
        return torch.cat(list(features), 0)

    def blank(self, device) -> torch.Tensor:
        """The features of one blank image: what a rank without understood images runs,
        so that under ZeRO-3 every rank gathers the frozen encoder's parameters together."""
        s = self.image_size
        if not self.uses_image_sizes:
            return self(torch.zeros(1, 3, s, s, device=device))
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n = image_size_to_num_patches((s, s), self.grid_pinpoints, s)
        return self(torch.zeros(n, 3, s, s, device=device), torch.tensor([[s, s]], device=device))

    def place(self, ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """embeds [T, D] of the text ids [T], with the placeholder rows replaced by
        features [n, D] in order (as LLaVA's masked_scatter). Without features the ids
        keep their embedding rows, as the VLM's own generate treats a placeholder id it
        decodes itself."""
        if features is None:
            return embeds
        slots = ids == self.image_token_id
        n = int(slots.sum())
        if features.shape[0] != n:
            raise ValueError(f"{n} image placeholder tokens but the understood images give {features.shape[0]} "
                             "feature rows: the images and the token counts the processor wrote disagree")
        return embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))
