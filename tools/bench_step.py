"""The train-step bench entries, registered in tools/bench.py.

    routing_vs_dense_finetune   the fused train step / a dense LlamaForCausalLM step
    routing_vs_both_towers      the fused step / both towers on every token (torch.where)
    dual_tower_vs_lmfusion      X-Fusion's Dual Tower step / the lmfusion step

tools/bench.py calls register(itself) after its helpers (the base config, the inputs,
the interleaved timing) are defined.
"""
from __future__ import annotations

import dataclasses

import torch

from megafusion.model.attention import hybrid_attention
from megafusion.model.fusion import LMFusionModel
from megafusion.model.layer_lmfusion import LMFusionLayer
from megafusion.model.towers import apply_rope

_bench = None  # tools/bench.py's module, set by register()


def register(bench) -> None:
    global _bench
    _bench = bench
    for entry in (routing_vs_dense_finetune, routing_vs_both_towers, dual_tower_vs_lmfusion):
        bench.benchmark(entry.__name__)(entry)


# ------------------------------------------------------------ both-towers baseline

class BothTowersDecoderLayer(LMFusionLayer):
    """The torch.where approach of a public LMFusion reimplementation: both towers' q/k/v,
    o and MLP run on every token (in sequence order) and each token keeps its modality's
    result. Same parameters as LMFusionLayer; only the forward differs."""

    def forward(self, h, is_image, cos, sin, layout, batch_size, seq_len):
        """h [B*L, hidden] in sequence order; is_image [B*L, 1] bool."""
        B, L, d = batch_size, seq_len, self.head_dim
        q, k, v = (torch.where(is_image, i, t) for t, i in zip(self.text.qkv(h), self.image.qkv(h)))
        q = q.view(B, L, self.num_heads, d).transpose(1, 2)
        k = k.view(B, L, self.num_kv_heads, d).transpose(1, 2)
        v = v.view(B, L, self.num_kv_heads, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = hybrid_attention(q, k, v, layout, scale=self.scale)
        o = o.transpose(1, 2).reshape(B * L, self.num_heads * d)
        h = h + torch.where(is_image, self.image.o_proj(o), self.text.o_proj(o))
        return torch.where(is_image, self.image.ffn(h), self.text.ffn(h))


class BothTowersModel(LMFusionModel):
    """LMFusionModel whose decoder stack runs BothTowersDecoderLayer in sequence order:
    the residual stream leaves the modality-sorted order once before the first layer and
    returns once after the last, so the baseline pays no per-layer gather."""

    def __init__(self, base_model, cfg):
        super().__init__(base_model, cfg)
        for layer in self.layers:
            layer.__class__ = BothTowersDecoderLayer

    def _run_layers(self, h, routing, cos, sin, layout, kept=None):
        B, L = routing.batch_size, routing.seq_len
        x = routing.to_sequence(h).reshape(B * L, -1)
        is_image = (routing.inv >= routing.n_text).unsqueeze(1)  # sorted position -> modality
        for layer in self.layers:
            x = layer(x, is_image, cos, sin, layout, B, L)
        return routing.to_sorted(x.view(B, L, -1))


# ---------------------------------------------------------------- train-step entries

# Each train-step entry compares the fused step with one baseline. The selected entries'
# baselines and the fused step are timed in one interleaved round (fused, dense,
# both_towers, then the reverse, ...): one fused timing serves both ratios, and all three
# see the same machine load.
STEP_BASELINES = {"routing_vs_dense_finetune": "dense", "routing_vs_both_towers": "both_towers",
                  "dual_tower_vs_lmfusion": "dual_tower"}


def step_times(ctx, entry: str):
    def build():
        batch, _, ids = _bench.step_inputs(ctx)
        models = {"fused": _bench.fused_model(ctx)}
        steps = {"fused": _bench.fused_step(ctx, models["fused"])}
        wanted = [STEP_BASELINES[n] for n in STEP_BASELINES if n in ctx.selected or n == entry]
        if "dense" in wanted:
            models["dense"] = _bench.base_llama(ctx).train()
            steps["dense"] = _bench.train_step(models["dense"], lambda m: m(input_ids=ids, labels=ids).loss)
        if "both_towers" in wanted:
            models["both_towers"] = BothTowersModel(_bench.base_llama(ctx), _bench.fusion_config()).train()
            steps["both_towers"] = _bench.fused_step(ctx, models["both_towers"])
        if "dual_tower" in wanted:
            cfg = dataclasses.replace(_bench.fusion_config(), tower_mode="dual_tower")
            models["dual_tower"] = LMFusionModel(_bench.base_llama(ctx), cfg).train()
            steps["dual_tower"] = _bench.fused_step(ctx, models["dual_tower"])
        return _bench.interleaved(steps, ctx.repeats, setup=_bench.drop_grads(*models.values()))
    return ctx.cached("step_times", build)


def step_meta(ctx) -> dict:
    batch, _, _ = _bench.step_inputs(ctx)
    return {
        "tokens": ctx.sizes.step_tokens,
        "image_tokens": int((batch.modality == 1).sum()),
        "images": batch.num_images,
        "layers": ctx.sizes.layers,
        "what": "forward + backward, float32, batch of one packed row",
    }


def routing_vs_dense_finetune(ctx) -> dict:
    """Fused train step (frozen text tower, trainable image tower, pixel mode, linear
    patcher) / dense LlamaForCausalLM train step with every weight trainable and labels on
    all tokens, same number of tokens."""
    times = step_times(ctx, "routing_vs_dense_finetune")
    return _bench.ratio_entry(times.only("fused", "dense"), "fused", "dense", goal=0.95, **step_meta(ctx))


def routing_vs_both_towers(ctx) -> dict:
    """Fused train step / the same model computing both towers on every token and
    selecting with torch.where (BothTowersModel)."""
    times = step_times(ctx, "routing_vs_both_towers")
    return _bench.ratio_entry(times.only("fused", "both_towers"), "fused", "both_towers", goal=0.6,
                              **step_meta(ctx))


def dual_tower_vs_lmfusion(ctx) -> dict:
    """X-Fusion's Dual Tower train step (model.tower_mode=dual_tower) / the lmfusion step,
    same tokens: the price of letting both towers read every token. The paper's
    implementation runs both blocks on the whole sequence, about 2x; this one runs the
    second tower's q/k/v and attention only (megafusion/model/layer_dual_tower.py)."""
    times = step_times(ctx, "dual_tower_vs_lmfusion")
    return _bench.ratio_entry(times.only("dual_tower", "fused"), "dual_tower", "fused", goal=2.0, **step_meta(ctx))
