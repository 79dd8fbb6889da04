"""model.tower_mode xfuse (X-Fusion's X-Fuse): dual_tower, and each image token's output
is a learned mix of both towers' outputs, alpha x text block + beta x vision block, with
alpha and beta learnable scalars per layer. They start at 0 and 1, where the layer equals
dual_tower exactly. Text tokens keep the text block's output alone, so text-only input
still gives the base model's logits and the text path stays frozen.

Cost over dual_tower: the text block's o_proj and MLP also run on the image rows, whose
output the mix now uses."""
from __future__ import annotations

import torch

from .layer_dual_tower import DualTowerLayer
from .routing import Routing
from .towers import HeadShape


class XFuseLayer(DualTowerLayer):
    scalar_starts = {"alpha": 0.0, "beta": 1.0}

    def __init__(self, llama_layer, heads: HeadShape, clone, image_norm):
        super().__init__(llama_layer, heads, clone, image_norm)
        self.make_scalars()

    def mix(self, h, routing: Routing, cos, sin, attend):
        n = routing.n_text
        o_text, o_image = self.attend_both(h, routing, cos, sin, attend)
        h_image = h[n:]
        text_block = self.text.finish(h_image, self.rows(o_text, routing, "image"))
        vision_block = self.image.finish(h_image, self.rows(o_image, routing, "image"))
        mixed = self.alpha.to(h.dtype) * text_block + self.beta.to(h.dtype) * vision_block
        return torch.cat([self.text.finish(h[:n], self.rows(o_text, routing, "text")), mixed], 0)
