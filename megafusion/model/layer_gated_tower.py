"""model.tower_mode gated_tower: the frozen LLM reads image tokens with its own weights,
and a trainable gated block adds to the image tokens' output (X-Fusion's "Gated Layer"
baseline, in Flamingo's form).

The exact form, per layer, with F_text the frozen block and F_gate a trainable copy of it
(initialised from the layer's weights), both reading the same input h:
    text token:  F_text(h)
    image token: F_text(h) + tanh(g) x (F_gate(h) - h),   g a learnable scalar, g = 0 at start.
Why this form: Flamingo's tanh gate at 0 makes the model start as the frozen LLM (image
tokens through text weights, only the patch embedding and output trainable), the
baseline the design is meant to be; the gated block is placed in parallel with the
frozen one (He et al., 2022: parallel adapters match sequential ones) so both read the
same h, one cache entry holds both blocks' keys and values, and the block's residual
delta F_gate(h) - h is what the gate scales. Only image tokens receive the gated delta:
text-only input gives the base model's logits exactly, and text reads images through the
frozen attention, whose image keys and values the gated blocks shape.
"""
from __future__ import annotations

import torch

from .routing import Routing
from .towers import DecoderLayer, HeadShape, image_twin


class GatedTowerLayer(DecoderLayer):
    scalar_starts = {"gate": 0.0}

    def __init__(self, llama_layer, heads: HeadShape, clone, image_norm):
        super().__init__(llama_layer, heads)
        self.image = image_twin(self.text, clone, image_norm)  # F_gate
        self.make_scalars()

    def mix(self, h, routing: Routing, cos, sin, attend):
        n = routing.n_text
        o_text, o_gate = attend([self.stream(self.text, h, routing, cos, sin), self.stream(self.image, h, routing, cos, sin)])
        h_image = h[n:]
        frozen = self.text.finish(h_image, self.rows(o_text, routing, "image"))
        delta = self.image.finish(h_image, self.rows(o_gate, routing, "image")) - h_image
        image_out = frozen + torch.tanh(self.gate).to(h.dtype) * delta
        return torch.cat([self.text.finish(h[:n], self.rows(o_text, routing, "text")), image_out], 0)
