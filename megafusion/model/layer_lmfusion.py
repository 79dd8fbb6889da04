"""model.tower_mode lmfusion (the default; X-Fusion's "Dual Projection"): each token goes
through its own modality's norms, q/k/v/o and MLP, and one attention runs over all
tokens' queries, keys and values under the hybrid mask. A token costs what it costs in
the dense model."""
from __future__ import annotations

import torch

from .routing import Routing
from .towers import DecoderLayer, HeadShape, image_twin


class LMFusionLayer(DecoderLayer):
    def __init__(self, llama_layer, heads: HeadShape, clone, image_norm):
        super().__init__(llama_layer, heads)
        self.image = image_twin(self.text, clone, image_norm)

    def mix(self, h, routing: Routing, cos, sin, attend):
        n = routing.n_text
        # Each tower projects its own tokens; both run even on an empty slice (see Routing.run).
        q, k, v = (torch.cat(p, 0) for p in zip(self.text.qkv(h[:n]), self.image.qkv(h[n:])))
        o, = attend([self.heads(q, k, v, routing, cos, sin)])
        o = self.rows(o, routing)
        return torch.cat([self.text.finish(h[:n], o[:n]), self.image.finish(h[n:], o[n:])], 0)
