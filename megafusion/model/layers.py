"""model.tower_mode -> the decoder-layer design (one file each, megafusion/model/layer_*.py;
the pieces they share are in megafusion/model/towers.py)."""
from __future__ import annotations

from .config import TOWER_MODES
from .layer_dual_tower import DualTowerLayer
from .layer_gated_tower import GatedTowerLayer
from .layer_lmfusion import LMFusionLayer
from .layer_single_tower import SingleTowerLayer
from .layer_xfuse import XFuseLayer
from .towers import DecoderLayer, HeadShape

LAYER_CLASSES: dict[str, type[DecoderLayer]] = {
    "lmfusion": LMFusionLayer,
    "dual_tower": DualTowerLayer,
    "xfuse": XFuseLayer,
    "single_tower": SingleTowerLayer,
    "gated_tower": GatedTowerLayer,
}
assert tuple(LAYER_CLASSES) == TOWER_MODES


def make_layer(tower_mode: str, llama_layer, heads: HeadShape, clone, image_norm) -> DecoderLayer:
    return LAYER_CLASSES[tower_mode](llama_layer, heads, clone, image_norm)
