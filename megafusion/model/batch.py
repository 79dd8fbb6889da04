"""The packed batch: the one format the data pipeline produces and the model consumes.

A row of length L holds several documents back to back (packing). Each document is a
sequence of segments: text token ids, or an image that occupies `tokens_per_image`
consecutive positions (its patches in raster order). Begin/end-of-image tokens are
ordinary text segments placed by whoever builds the documents.

Every per-position tensor is [B, L]:
  input_ids     text token id; 0 at image positions (never looked up)
  labels        target token id at this position, -100 where no loss (image positions,
                padding, prompts excluded from the loss). Unshifted, as in transformers:
                the model predicts labels[i+1] from position i within one document.
  modality      0 text, 1 image
  position_ids  RoPE position, restarting at 0 for every document
  document_ids  same value for all positions of one document; padding gets its own id
  image_ids     index into `images` for image positions, -1 for text

With a LLaVA base (LLaVAFusion, megafusion/model/vlm.py) an image to be understood can
instead be a VLMImageSegment: its placeholder tokens are text positions (the frozen text
tower reads the VLM's features there, with no loss), and its pixels, as the VLM's
processor made them, go to vlm_pixel_values (and vlm_image_sizes for LLaVA-NeXT).

Per image (N images in row-major order of appearance):
  images        [N, C, h, w] clean latents (or pixels in [-1, 1] when images_are_latents
                is False and the model must run the VAE encoder)
  timesteps     [N] diffusion time in [0, num_train_timesteps); 0 means clean
  image_is_condition [N] True when the image precedes its caption (understanding)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

TEXT, IMAGE = 0, 1
IGNORE_INDEX = -100


@dataclass
class TextSegment:
    ids: Sequence[int]
    loss: bool = True


@dataclass
class ImageSegment:
    image: torch.Tensor  # [C, h, w]
    timestep: float = 0.0
    is_condition: bool = False
    # [P, D]: the feature-alignment encoder's patch features of this image, pre-encoded
    # into the shards (tools/prepare_data.py --align-encoder); None when not.
    features: torch.Tensor | None = None


@dataclass
class VLMImageSegment:
    """An image understood through a LLaVA base's own vision path: `n_tokens` copies of
    the VLM's image placeholder id, whose embeddings become the image's features."""

    pixel_values: torch.Tensor  # [C, H, W] (LLaVA) or [crops, C, H, W] (LLaVA-NeXT)
    token_id: int
    n_tokens: int
    image_size: tuple[int, int] | None = None  # (height, width), LLaVA-NeXT

    @property
    def ids(self) -> list[int]:
        return [self.token_id] * self.n_tokens


Document = Sequence["TextSegment | ImageSegment | VLMImageSegment"]


def document_length(doc: Document, tokens_per_image: int) -> int:
    return sum(tokens_per_image if isinstance(s, ImageSegment) else len(s.ids) for s in doc)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    modality: torch.Tensor
    position_ids: torch.Tensor
    document_ids: torch.Tensor
    image_ids: torch.Tensor
    images: torch.Tensor
    timesteps: torch.Tensor
    image_is_condition: torch.Tensor
    images_are_latents: bool = True
    # [N, P, D] pre-encoded feature-alignment targets, one per image (megafusion/model/align.py);
    # None: the model encodes the images itself when it aligns.
    align_features: torch.Tensor | None = None
    # Images understood through a LLaVA base's own path, in order of appearance: all
    # their pixel tensors concatenated on dim 0, and (LLaVA-NeXT) each one's [height, width].
    vlm_pixel_values: torch.Tensor | None = None
    vlm_image_sizes: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    def to(self, device=None, dtype=None) -> "PackedBatch":
        """Every tensor to `device`; only `images` to `dtype`. Timesteps stay fp32: they
        are times and table indices, and bf16 cannot hold them (999 rounds to 1000)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if f.name == "images" and dtype is not None else v.dtype)
            out[f.name] = v
        return PackedBatch(**out)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Sequence[Document]],
        seq_len: int,
        tokens_per_image: int,
        image_shape: Sequence[int] | None = None,
        images_are_latents: bool = True,
        feature_shape: Sequence[int] | None = None,
    ) -> "PackedBatch":
        """Lay out documents row by row; each row is padded to seq_len. feature_shape
        (P, D): every image carries pre-encoded alignment features of that shape, stacked
        into align_features (an empty [0, P, D] when the batch has no image).

        Raises ValueError when a row does not fit: splitting an image across rows is
        never allowed, and choosing what goes in which row is the packer's job.
        """
        B = len(rows)
        input_ids = torch.zeros(B, seq_len, dtype=torch.long)
        labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
        modality = torch.zeros(B, seq_len, dtype=torch.long)
        position_ids = torch.zeros(B, seq_len, dtype=torch.long)
        document_ids = torch.zeros(B, seq_len, dtype=torch.long)
        image_ids = torch.full((B, seq_len), -1, dtype=torch.long)
        images, timesteps, is_cond, features = [], [], [], []
        vlm_pixels, vlm_sizes = [], []
        for b, docs in enumerate(rows):
            pos = 0
            for d, doc in enumerate(docs):
                start = pos
                for seg in doc:
                    if isinstance(seg, (TextSegment, VLMImageSegment)):
                        n = len(seg.ids)
                        if pos + n > seq_len:
                            raise ValueError(f"row {b} overflows seq_len={seq_len}")
                        ids = torch.as_tensor(list(seg.ids), dtype=torch.long)
                        input_ids[b, pos:pos + n] = ids
                        if isinstance(seg, VLMImageSegment):
                            px = seg.pixel_values
                            vlm_pixels.append(px if px.dim() == 4 else px.unsqueeze(0))
                            if seg.image_size is not None:
                                vlm_sizes.append(list(seg.image_size))
                        elif seg.loss:
                            labels[b, pos:pos + n] = ids
                    else:
                        n = tokens_per_image
                        if pos + n > seq_len:
                            raise ValueError(f"row {b}: an image would cross seq_len={seq_len}")
                        modality[b, pos:pos + n] = IMAGE
                        image_ids[b, pos:pos + n] = len(images)
                        images.append(seg.image)
                        timesteps.append(float(seg.timestep))
                        is_cond.append(bool(seg.is_condition))
                        features.append(seg.features)
                    pos += n
                position_ids[b, start:pos] = torch.arange(pos - start)
                document_ids[b, start:pos] = d
            # Padding is one extra document per row: attends only to itself, no loss.
            position_ids[b, pos:] = torch.arange(seq_len - pos)
            document_ids[b, pos:] = len(docs)
        if images:
            images_t = torch.stack(images)
        else:
            shape = tuple(image_shape) if image_shape is not None else (0, 0, 0)
            images_t = torch.zeros((0, *shape))
        align = None
        if feature_shape is not None:
            if any(f is None or tuple(f.shape) != tuple(feature_shape) for f in features):
                raise ValueError(f"every image needs alignment features of shape {tuple(feature_shape)}")
            align = torch.stack(features).float() if features else torch.zeros((0, *feature_shape))
        return cls(
            input_ids=input_ids,
            labels=labels,
            modality=modality,
            position_ids=position_ids,
            document_ids=document_ids,
            image_ids=image_ids,
            images=images_t,
            timesteps=torch.tensor(timesteps, dtype=torch.float32),
            image_is_condition=torch.tensor(is_cond, dtype=torch.bool),
            images_are_latents=images_are_latents,
            align_features=align,
            vlm_pixel_values=torch.cat(vlm_pixels) if vlm_pixels else None,
            vlm_image_sizes=torch.tensor(vlm_sizes, dtype=torch.long) if vlm_sizes else None,
        )
