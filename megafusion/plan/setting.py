"""A parallel setting the planner weighs (what a DeepSpeed config and the run config's
parallel/train sections say), and the workload one micro-batch carries."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megafusion.plan.shapes import ModelShape


@dataclass(frozen=True)
class Setting:
    zero_stage: int                 # 1 (only with pipeline stages), 2 or 3
    pipeline_stages: int = 1
    micro_batch: int = 1            # sequences per micro-batch per data-parallel rank
    grad_accum: int = 1
    checkpointing: bool = True      # activation checkpointing of every decoder layer
    # ZeRO-3 knobs, in parameters (DeepSpeed's units).
    prefetch_bucket: int = 500_000_000
    max_live: int = 3_000_000_000
    max_reuse: int = 3_000_000_000
    persistence: int = 100_000      # stage3_param_persistence_threshold: smaller tensors stay whole
    sub_group: int = 1_000_000_000
    reduce_bucket: int = 500_000_000
    # ZeRO++ (zero_quantized_weights, zero_hpz_partition_size).
    quantized_weights: bool = False
    hpz: int = 1
    # Gradient reduction dtype bytes (communication_data_type) and the gradient
    # partition's dtype bytes (data_types.grad_accum_dtype).
    grad_comm_bytes: int = 4
    grad_accum_bytes: int = 4
    weight_bytes: int = 2           # bf16 training (fp32: 4, with no separate master copy)

    @property
    def name(self) -> str:
        if self.pipeline_stages > 1:
            return f"pipeline {self.pipeline_stages} + ZeRO-1"
        extras = (["qwZ"] if self.quantized_weights else []) + ([f"hpZ {self.hpz}"] if self.hpz > 1 else [])
        return f"ZeRO-{self.zero_stage}" + (" + " + " + ".join(extras) if extras else "")

    def with_(self, **changes) -> "Setting":
        return replace(self, **changes)


@dataclass(frozen=True)
class Workload:
    """Tokens of one micro-batch of one data-parallel rank, by kind. Packed rows hold
    documents of `caption_tokens` text + BOI + an image + EOI (the image-caption data the
    large configs train on); a row's leftover tokens count as text."""

    seq_len: int
    micro_batch: int
    caption_tokens: int
    tokens_per_image: int

    @property
    def doc_len(self) -> int:
        return self.caption_tokens + 2 + self.tokens_per_image

    @property
    def docs_per_row(self) -> int:
        return max(1, self.seq_len // self.doc_len)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def images(self) -> int:
        return self.micro_batch * self.docs_per_row

    @property
    def image_tokens(self) -> int:
        return self.images * self.tokens_per_image

    @property
    def text_tokens(self) -> int:
        return self.tokens - self.image_tokens

    @property
    def logit_tokens(self) -> int:
        """Positions where the model computes logits: the text targets (the fused model
        skips image positions)."""
        return self.text_tokens

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs the hybrid mask allows: per document, causal text, the image's
        tokens see the prefix and the whole image; leftover text is causal."""
        c, n = self.caption_tokens, self.tokens_per_image
        per_doc = c * (c + 1) // 2 + (c + 1) + n * (c + 1 + n) + (c + n + 2)
        left = self.seq_len - self.docs_per_row * self.doc_len
        return self.micro_batch * (self.docs_per_row * per_doc + left * (left + 1) // 2)


def workload(shape: ModelShape, setting: Setting, seq_len: int, caption_tokens: int) -> Workload:
    return Workload(seq_len=seq_len, micro_batch=setting.micro_batch, caption_tokens=caption_tokens,
                    tokens_per_image=shape.tokens_per_image)


def ring(n: int) -> float:
    """Share of a collective's buffer each rank receives in a ring all-gather or
    reduce-scatter over n ranks."""
    return (n - 1) / n if n > 1 else 0.0


def part(numel: int, n: int) -> int:
    return math.ceil(numel / n)
