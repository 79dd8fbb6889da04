"""model.tower_mode dual_tower (X-Fusion's design): every layer has the frozen text block
and a trainable vision block (a full copy of the layer); both process the whole sequence
and each token takes its output from its own tower. So image queries attend to keys and
values of every token (text included) computed by the vision weights, and text queries
to keys and values of every token (images included) computed by the frozen text weights.

What is computed: both towers' q/k/v for every token and both attentions over the whole
sequence; o_proj and the MLP only where their output is kept (the text tower's on text
rows, the vision tower's on image rows). The text tower's output at an image position is
discarded by the design, so computing it, as running "the full block on the whole
sequence" literally would, changes nothing but the cost: this way the linear layers cost
lmfusion's plus one extra q/k/v projection of every token (megafusion/flops.py counts
it), not twice lmfusion's.
"""
from __future__ import annotations

import torch

from .routing import Routing
from .towers import DecoderLayer, HeadShape, image_twin


class DualTowerLayer(DecoderLayer):
    def __init__(self, llama_layer, heads: HeadShape, clone, image_norm):
        super().__init__(llama_layer, heads)
        self.image = image_twin(self.text, clone, image_norm)

    def attend_both(self, h, routing: Routing, cos, sin, attend):
        """Each tower's attention output [B, H, L, d] over the whole sequence."""
        return attend([self.stream(self.text, h, routing, cos, sin), self.stream(self.image, h, routing, cos, sin)])

    def mix(self, h, routing: Routing, cos, sin, attend):
        n = routing.n_text
        o_text, o_image = self.attend_both(h, routing, cos, sin, attend)
        return torch.cat([self.text.finish(h[:n], self.rows(o_text, routing, "text")),
                          self.image.finish(h[n:], self.rows(o_image, routing, "image"))], 0)
