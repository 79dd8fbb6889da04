"""Per-GPU memory of a training step, by part, as DeepSpeed 0.19 lays it out.

Model states (per trainable parameter unless said; w = the weight dtype's bytes):
- ZeRO-3 (stage3.py): every tensor above stage3_param_persistence_threshold is split over
  the N ranks (frozen ones too, as 16-bit shards with no optimizer state); smaller ones
  stay whole on every rank besides their shard. Gradient partitions are kept in
  data_types.grad_accum_dtype (grad_partitions_flat_buffer); the optimizer step turns one
  sub_group_size piece at a time into fp32; fp32 master weights and Adam's m and v are
  partitioned. Working set: the gathered layers (the running one plus the prefetch
  bucket, capped by stage3_max_live_parameters) and the reduce bucket.
- ZeRO-2 (stage_1_and_2.py): 16-bit weights whole on every rank (the frozen tower too),
  gradients reduced into partitions, an fp32 copy of this rank's gradient partition at the
  step, master and moments partitioned, two reduce buckets (overlap_comm).
  DeepSpeed's estimate_zero2_model_states_mem_needs counts the same: 2 + 18 / N per
  parameter.
- Pipeline + ZeRO-1 with bf16 and fp32 gradient accumulation (bf16_optimizer.py): per
  stage, weights and bf16 gradients whole, an fp32 gradient accumulation buffer whole,
  master and moments partitioned over the stage's D replicas.

Activations per micro-batch (bf16; attention by a flash or flex kernel, which keeps no
(query, key) matrix): a decoder layer keeps, per token, its input, the routing copies
into and out of the towers, q, k, v, the attention output, the residual, the MLP's gate,
up, activation and product, and for each RMSNorm its fp32 input and normalised output.
With activation checkpointing only each layer's input is kept, and one layer at a time is
recomputed in the backward pass (its activations and their gradients). Logits are
computed at text positions only: bf16 logits, their fp32 copy in the loss and the bf16
gradient. The U-Net patcher (at the latent resolution, not checkpointed) keeps about seven
feature maps per ResNet block on each side.
"""
from __future__ import annotations

from megafusion.plan.setting import Setting, Workload, part
from megafusion.plan.shapes import ModelShape, stage_layers

FP32 = 4


def layer_activation_bytes_per_token(shape: ModelShape, w: int, image_share: float = 0.0) -> float:
    """Bytes a decoder layer keeps per token; image_share, the share of image tokens,
    matters to the designs that run a second block's o_proj and MLP on them."""
    h, kv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    kept = h + 2 * h + h + 2 * kv + h + h + 4 * i  # input, routing in/out, q, k+v, attn out, residual, MLP
    total = w * kept + 2 * (FP32 + w) * h          # + two RMSNorms
    if shape.tower_mode in ("dual_tower", "xfuse", "gated_tower"):  # a second attention stream on every token
        total += w * (h + 2 * kv + h) + (FP32 + w) * h
    if shape.tower_mode in ("xfuse", "gated_tower"):  # the second block's residual, MLP and norm at image tokens
        total += image_share * (w * (h + 4 * i) + (FP32 + w) * h)
    return total


def unet_activation_bytes_per_image(shape: ModelShape, w: int) -> int:
    if not shape.unet_channels:
        return 0
    _, h, wd = shape.latent
    per_side = sum(7 * shape.unet_layers_per_block * c for c in shape.unet_channels) + 3 * shape.unet_channels[0]
    return 2 * per_side * h * wd * w


def activation_parts(shape: ModelShape, s: Setting, wl: Workload, layers: int, in_flight: int,
                     logits: bool, unet_sides: int) -> dict:
    """Activation memory of a rank running `layers` decoder layers with `in_flight`
    micro-batches alive (1 without pipeline stages)."""
    w = s.weight_bytes
    per_layer = int(wl.tokens * layer_activation_bytes_per_token(shape, w, wl.image_tokens / max(1, wl.tokens)))
    layer_input = wl.tokens * shape.hidden * w
    if s.checkpointing:
        act = in_flight * (layers + 1) * layer_input
        recompute = 2 * per_layer
    else:
        act = in_flight * (layers * per_layer + layer_input)
        recompute = 0
    return {
        "activations": act,
        "recomputed layer": recompute,
        "logits": wl.logit_tokens * shape.vocab * (2 * w + FP32) if logits else 0,
        "U-Net activations": in_flight * wl.images * unet_activation_bytes_per_image(shape, w) * unet_sides // 2,
        # For the report: what the layers would keep without checkpointing.
        "_activations without checkpointing": in_flight * (layers * per_layer + layer_input),
    }


def regathered(shape: ModelShape, s: Setting) -> int:
    """Partitioned parameters ZeRO-3 gathers again for the backward pass. After its
    forward use a parameter stays gathered when the parameters used before its backward
    use (everything after it, forward and back) are at most stage3_max_reuse_distance,
    while the kept ones fit in stage3_max_live_parameters (stage3.py's
    PartitionedParameterCoordinator); the rest are released and gathered again."""
    def big(params):
        return sum(p.numel for p in params if p.numel > s.persistence)

    layers = [big(p for p in shape.params if p.layer == i) for i in range(shape.layers)]
    head = big(p for p in shape.params if p.layer is None and not _input_side(p.name))
    inputs = big(p for p in shape.params if p.layer is None and _input_side(p.name))
    kept, after = 0, 0
    for numel in [head, *reversed(layers), inputs]:  # from the last used in the forward pass
        if 2 * after <= s.max_reuse and kept + numel <= s.max_live:
            kept += numel
        after += numel
    return max(0, after - kept)


def _input_side(name: str) -> bool:
    return name.startswith(("embed_tokens.", "image_token_embed", "image_tokenizer."))


def zero3(shape: ModelShape, s: Setting, wl: Workload, world: int, gpus_per_node: int) -> dict:
    w, n = s.weight_bytes, world

    def held(p):  # a shard, plus the whole tensor when it is below the persistence threshold
        return part(p.numel, n) + (p.numel if p.numel <= s.persistence else 0)

    frozen = [p for p in shape.params if not p.trainable]
    trainable = [p for p in shape.params if p.trainable]
    t_part = sum(part(p.numel, n) for p in trainable)
    partitioned = sum(p.numel for p in shape.params if p.numel > s.persistence)
    # The running layer and the prefetched ones, plus what stays gathered from the
    # forward pass until its backward (see regathered).
    kept = partitioned - regathered(shape, s)
    gathered = min(max(s.max_live, shape.layer_both_towers), shape.layer_both_towers + s.prefetch_bucket + kept,
                   partitioned)
    parts = {
        "frozen weights": w * sum(held(p) for p in frozen),
        "trainable weights": w * sum(held(p) for p in trainable),
        "gradients": s.grad_accum_bytes * t_part,
        "fp32 gradient (step)": FP32 * min(s.sub_group, t_part) if s.grad_accum_bytes != FP32 else 0,
        "master weights": FP32 * t_part if w != FP32 else 0,
        "optimizer states": 2 * FP32 * t_part,
        "gathered weights": w * gathered,
        "hpZ secondary shards": w * part(partitioned, s.hpz) if s.hpz > 1 else 0,
        "buffers": s.grad_comm_bytes * s.reduce_bucket,
    }
    parts.update(activation_parts(shape, s, wl, shape.layers, 1, logits=True, unet_sides=2))
    return parts


def zero2(shape: ModelShape, s: Setting, wl: Workload, world: int, gpus_per_node: int) -> dict:
    w, n = s.weight_bytes, world
    t_part = sum(part(p.numel, n) for p in shape.params if p.trainable)
    parts = {
        "frozen weights": w * shape.frozen,
        "trainable weights": w * shape.trainable,
        "gradients": w * t_part,
        "fp32 gradient (step)": FP32 * t_part if w != FP32 else 0,
        "master weights": FP32 * t_part if w != FP32 else 0,
        "optimizer states": 2 * FP32 * t_part,
        "gathered weights": 0,
        "hpZ secondary shards": 0,
        "buffers": 2 * w * s.reduce_bucket,
    }
    parts.update(activation_parts(shape, s, wl, shape.layers, 1, logits=True, unet_sides=2))
    return parts


def pipeline_stage(shape: ModelShape, s: Setting, wl: Workload, world: int, stage: int) -> dict:
    w, stages = s.weight_bytes, s.pipeline_stages
    replicas = world // stages
    params = shape.stage_params(stage, stages)
    frozen = sum(p.numel for p in params if not p.trainable)
    trainable = sum(p.numel for p in params if p.trainable)
    t_part = sum(part(p.numel, replicas) for p in params if p.trainable)
    lo, hi = stage_layers(shape.layers, stage, stages)
    parts = {
        "frozen weights": w * frozen,
        "trainable weights": w * trainable,
        "gradients": w * trainable,
        "fp32 gradient (step)": FP32 * trainable if w != FP32 else 0,  # the accumulation buffer
        "master weights": FP32 * t_part if w != FP32 else 0,
        "optimizer states": 2 * FP32 * t_part,
        "gathered weights": 0,
        "hpZ secondary shards": 0,
        "buffers": 0,
    }
    # 1F1B: stage s has at most stages - s micro-batches between their forward and backward.
    in_flight = min(stages - stage, s.grad_accum)
    # The first stage runs the U-Net's input side, the last its output side.
    parts.update(activation_parts(shape, s, wl, hi - lo, in_flight, logits=stage == stages - 1,
                                  unet_sides=(stage == 0) + (stage == stages - 1)))
    return parts


def memory(shape: ModelShape, s: Setting, wl: Workload, world: int, gpus_per_node: int) -> dict:
    """Bytes per GPU by part, for the rank that needs most (with pipeline stages, the
    largest stage); "total" sums the parts (keys starting with _ are shown, not summed)."""
    if s.pipeline_stages > 1:
        stages = [pipeline_stage(shape, s, wl, world, i) for i in range(s.pipeline_stages)]
        parts = max(stages, key=_total)
        parts["_stage"] = stages.index(parts)
    elif s.zero_stage == 3:
        parts = zero3(shape, s, wl, world, gpus_per_node)
    elif s.zero_stage == 2:
        parts = zero2(shape, s, wl, world, gpus_per_node)
    else:
        raise ValueError(f"the planner weighs ZeRO-2, ZeRO-3 and pipeline + ZeRO-1, not ZeRO-{s.zero_stage} alone")
    parts["total"] = _total(parts)
    return parts


def _total(parts: dict) -> int:
    return sum(v for k, v in parts.items() if not k.startswith("_") and k != "total")


def model_states(parts: dict, s: Setting) -> dict:
    """The parts DeepSpeed holds between steps, in megafusion.parallel.memory.held_bytes'
    terms (params, grads, master, optimizer_state): the pipeline's fp32 gradient
    accumulation buffer lives across steps, ZeRO's fp32 step gradient does not."""
    grads = parts["gradients"] + (parts["fp32 gradient (step)"] if s.pipeline_stages > 1 else 0)
    return {"params": parts["frozen weights"] + parts["trainable weights"], "grads": grads,
            "master": parts["master weights"], "optimizer_state": parts["optimizer states"]}
