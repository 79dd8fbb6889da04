"""From one shard row to the documents it contributes to a packed batch.

Image-caption row, one document:

  generation     BOS caption BOI image EOI EOS        (generation_ratio of rows)
  understanding  BOS BOI image EOI caption EOS        (the rest; the image is a condition)
  understanding with a LLaVA base (LLaVAFusion)
                 BOS <image> x n "\n" caption EOS  (the VLM's own path: its processor's
                 placeholder tokens, read by the frozen text tower as the VLM does)

Loss: caption tokens and EOS are targets. EOI is labelled but never a target: the
position that would predict it is the image's last token, and image positions predict
nothing (LMFusionModel.lm_targets; an image is always followed by EOI, so sampling
appends it rather than asking the model). BOI is a TextSegment whose target the model
itself masks (FusionConfig.lm_loss_on_boi); BOS is never a target (nothing precedes it).
For caption_drop of the generation rows the caption is the empty prompt (classifier-
free guidance); EOS stays a target. Generation images get the objective's training
timesteps; condition images t <= FusionConfig.condition_t_cap.

Text row: BOS text EOS, cut into documents of at most seq_len tokens.

Every random choice is a function of (seed, epoch, global sample index) only, never of
global RNG state, so a resumed run, another worker count or another rank reproduces it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megafusion.model.batch import Document, ImageSegment, TextSegment, VLMImageSegment


def image_token_ids(vocab_size: int) -> tuple[int, int]:
    """(BOI, EOI): the two embedding rows the fused model appends after the base vocabulary."""
    return int(vocab_size), int(vocab_size) + 1


_EOS_FALLBACKS = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>")


def text_special_ids(tokenizer) -> tuple[int | None, int]:
    """(BOS, EOS) that open and close every document.

    The tokenizer's own, except when its EOS is missing or equals its BOS (SmolLM2's
    GGUF export says eos = bos = <|im_start|>): then the first of <|im_end|>,
    <|endoftext|>, </s>, <eos> the vocabulary has. Generation must stop on the same id.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None or eos == bos:
        vocab = tokenizer.get_vocab()
        found = next((vocab[t] for t in _EOS_FALLBACKS if t in vocab and vocab[t] != bos), None)
        if found is None:
            raise ValueError("tokenizer has no end-of-text token distinct from its BOS; set data.eos_token_id")
        eos = found
    return bos, int(eos)


# ------------------------------------------------------------------------ randomness

@dataclass(frozen=True)
class SamplePlan:
    understanding: bool  # image before caption
    drop_caption: bool  # generation with the empty prompt
    timestep_seed: int


def plan_sample(seed: int, epoch: int, index: int, generation_ratio: float, caption_drop: float) -> SamplePlan:
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    u_order, u_drop = rng.random(2)
    understanding = bool(u_order >= generation_ratio)
    drop = (not understanding) and bool(u_drop < caption_drop)
    return SamplePlan(understanding, drop, int(rng.integers(0, 2**62)))


def sample_timestep(objective, is_condition: bool, cap: int, seed: int) -> float:
    """One image's diffusion time through the model's objective, from a private generator.

    The adapter keeps the call site small and swappable: objective is
    megafusion.model.diffusion.make_objective(cfg), whose sample_timesteps(is_condition,
    cap, generator) draws generation times from its training distribution and condition
    times uniformly in [0, cap].
    """
    g = torch.Generator().manual_seed(int(seed))
    return float(objective.sample_timesteps(torch.tensor([bool(is_condition)]), int(cap), g)[0])


# ------------------------------------------------------------------------- documents

def image_caption_document(caption_ids: list[int], image: torch.Tensor, plan: SamplePlan, timestep: float,
                           bos: int | None, eos: int, boi: int, eoi: int, features=None) -> Document:
    head = [TextSegment([bos], loss=False)] if bos is not None else []
    img = ImageSegment(image=image, timestep=float(timestep), is_condition=plan.understanding, features=features)
    if plan.understanding:
        return head + [TextSegment([boi]), img, TextSegment([eoi]), TextSegment(list(caption_ids) + [eos])]
    prompt = [] if plan.drop_caption else [TextSegment(list(caption_ids))]
    return head + prompt + [TextSegment([boi]), img, TextSegment([eoi, eos])]


def vlm_understanding_document(caption_ids: list[int], image: VLMImageSegment, separator: list[int],
                               bos: int | None, eos: int) -> Document:
    """An understanding row for a LLaVA base: the image as the VLM reads it, then the caption."""
    head = [TextSegment([bos], loss=False)] if bos is not None else []
    return head + [image, TextSegment(list(separator), loss=False), TextSegment(list(caption_ids) + [eos])]


def text_documents(ids: list[int], bos: int | None, eos: int, seq_len: int) -> list[Document]:
    ids = ([bos] if bos is not None else []) + list(ids) + [eos]
    return [[TextSegment(ids[i:i + seq_len])] for i in range(0, len(ids), seq_len)]
