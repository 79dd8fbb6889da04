"""model.tower_mode single_tower (X-Fusion's fine-tune-everything baseline): one tower,
the base layer's own modules, for every token, all of it trainable (the run needs
model.train_text_tower=true, and train.text_lr then applies to every layer weight).
The image tokenizer, the BOI/EOI rows and the image tokens' final norm are new modules
as in every design. Text-only input gives the base model's logits only before training."""
from __future__ import annotations

from .routing import Routing
from .towers import DecoderLayer, HeadShape


class SingleTowerLayer(DecoderLayer):
    def __init__(self, llama_layer, heads: HeadShape, clone=None, image_norm=None):
        super().__init__(llama_layer, heads)

    def mix(self, h, routing: Routing, cos, sin, attend):
        o, = attend([self.stream(self.text, h, routing, cos, sin)])
        return self.text.finish(h, self.rows(o, routing))
