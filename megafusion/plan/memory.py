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
  gradients reduced into partitions (a buffer of the parameters that overlap this rank's
  share of each flattened optimizer group, zero2_gradient_buffer), an fp32 copy of this rank's gradient partition at the
  step, master and moments partitioned, two reduce buckets (overlap_comm).
  DeepSpeed's estimate_zero2_model_states_mem_needs counts the same: 2 + 18 / N per
  parameter.
- Pipeline + ZeRO-1 with bf16 and fp32 gradient accumulation (bf16_optimizer.py): per
  stage, weights and bf16 gradients whole, an fp32 gradient accumulation buffer whole,
  master and moments partitioned over the stage's D replicas.

Activations per micro-batch (w bytes per value; attention by flash-attn, which keeps q,
k, v, its output and an fp32 log-sum-exp, no (query, key) matrix) are what autograd
saves for the backward pass, tensor by tensor (tests/plan/test_activation_memory.py
measures them). Per token and tower, every RMSNorm keeps its fp32 input (and 1/rms) and
the MLP its gate, up and activation outputs (silu keeps its input, the product both
factors). A trainable tower also keeps what its weights' gradients read: each norm's
normalised input and output (the projections' input), the MLP's product (down_proj's
input) and the attention output routed back to sorted order (o_proj's input: in lmfusion
one tensor for all tokens, kept whole when either tower trains). A frozen linear layer
keeps nothing, so a frozen tower keeps none of these. Not kept: the layer's input, the
residual sums, the q/k/v copies into sequence order. An attention stream keeps q, k, v and
the output of every token, and for image queries (the flash decomposition's second call)
copies of their q, their output, and the keys and values of their document up to the
image's end. dual_tower, xfuse and gated_tower run two streams and both towers' input
norms on every token; xfuse and gated_tower run the frozen block's post-attention side on
image tokens too, and keep the inputs of their mix. With activation checkpointing a layer
keeps only its input, and one layer at a time is recomputed in the backward pass (its
activations and their gradients). After the last layer the final norms keep their fp32
inputs and, trainable, their normalised input (the image norm also its output, the
patcher's input). Logits are computed at text positions only: bf16 logits, their fp32
copy in the loss and the bf16 gradient. The U-Net patcher (at the latent resolution, not
checkpointed) keeps about seven feature maps per ResNet block on each side.
"""
from __future__ import annotations

from megafusion.plan.setting import Setting, Workload, part
from megafusion.plan.shapes import ModelShape, stage_layers

FP32 = 4


def _trains(shape: ModelShape, prefix: str) -> bool:
    return any(p.trainable for p in shape.params if p.name.startswith(prefix))


def _norm_bytes(h: int, w: int, trains: bool) -> int:
    """An RMSNorm's per-token keep: the fp32 input and 1/rms; trainable, also the
    normalised input (the weight's gradient) and the output (the next linear's)."""
    return FP32 * (h + 1) + (2 * w * h if trains else 0)


def layer_activation_bytes_per_token(shape: ModelShape, w: int, wl: Workload) -> float:
    """Bytes a decoder layer keeps for the backward pass, per token of the micro-batch wl
    (text and image tokens differ: frozen towers keep less, image queries more)."""
    h, kv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    mode = shape.tower_mode
    text = _trains(shape, "layers.0.text.")
    image = text if mode == "single_tower" else _trains(shape, "layers.0.image.")  # one tower for all tokens
    tokens, n_text, n_image = wl.tokens, wl.text_tokens, wl.image_tokens

    def mlp_side(trains):  # post-attention norm and MLP: gate, up, activation (+ product, trainable)
        return _norm_bytes(h, w, trains) + w * i * (4 if trains else 3)

    def o_in(trains):  # the attention output rows o_proj reads
        return w * h if trains else 0

    # One attention stream: q, k, v, output and log-sum-exp of every token; image queries
    # again (q, output, log-sum-exp) with their document's keys and values up to the image's end.
    stream = (tokens * (w * (2 * h + 2 * kv) + FP32 * shape.heads) + n_image * (2 * w * h + FP32 * shape.heads)
              + wl.images * 2 * w * kv * (wl.caption_tokens + 1 + wl.tokens_per_image))
    if mode in ("lmfusion", "single_tower"):
        total = (n_text * (_norm_bytes(h, w, text) + mlp_side(text))
                 + n_image * (_norm_bytes(h, w, image) + mlp_side(image)) + stream + tokens * o_in(text or image))
    else:  # two streams: both towers' q/k/v (and input norms) on every token
        total = (tokens * (_norm_bytes(h, w, text) + _norm_bytes(h, w, image)) + 2 * stream
                 + n_text * (mlp_side(text) + o_in(text)) + n_image * (mlp_side(image) + o_in(image)))
        if mode in ("xfuse", "gated_tower"):  # the frozen block's o_proj and MLP on image tokens too
            total += n_image * (mlp_side(text) + o_in(text))
            total += n_image * w * h * (2 if mode == "xfuse" else 1)  # the mix's inputs (alpha, beta / the gate)
    return total / max(1, tokens)


def head_activation_bytes(shape: ModelShape, w: int, wl: Workload) -> int:
    """The final norms after the last layer (the logits are counted apart). The text
    norm's output is cut to the target rows before the LM head, so only that copy (a
    logits-side tensor) is kept, not the output itself."""
    h = shape.hidden
    text = FP32 * (h + 1) + (w * h if _trains(shape, "text_norm.") else 0)
    return wl.text_tokens * text + wl.image_tokens * _norm_bytes(h, w, _trains(shape, "image_norm."))


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
    per_layer = int(wl.tokens * layer_activation_bytes_per_token(shape, w, wl))
    layer_input = wl.tokens * shape.hidden * w
    # After the last layer: the final norms where the head runs, else the stage's output.
    after = head_activation_bytes(shape, w, wl) if logits else layer_input
    without = in_flight * (layers * per_layer + after)
    if s.checkpointing:
        act = in_flight * (layers * layer_input + after)
        recompute = 2 * per_layer
    else:
        act = without
        recompute = 0
    return {
        "activations": act,
        "recomputed layer": recompute,
        "logits": wl.logit_tokens * shape.vocab * (2 * w + FP32) if logits else 0,
        "U-Net activations": in_flight * wl.images * unet_activation_bytes_per_image(shape, w) * unet_sides // 2,
        # For the report: what the layers would keep without checkpointing.
        "_activations without checkpointing": without,
    }


def regathered(shape: ModelShape, s: Setting) -> int:
    """Partitioned parameters ZeRO-3 gathers again for the backward pass. After its
    module's forward a parameter stays gathered when it is used again before the
    modules traced after it hold stage3_max_reuse_distance parameters (everything used
    after it, forward and back: twice what follows it in the forward pass); the rest are
    released and gathered again (partitioned_param_coordinator.py, __params_to_release:
    stage3_max_live_parameters bounds only the prefetch). The head is used again at
    once, its backward following its forward, and so is a tied embedding, which is the
    head (megafusion/parallel/engine.py keeps it gathered all step); the input side is
    used last in the backward pass, but for what has no backward (forward_only).
    tests/plan/test_plan.py compares this with DeepSpeed's gathers on two CPU ranks."""
    def big(params):
        return sum(p.numel for p in params if p.numel > s.persistence)

    tied = _tied(shape)

    def at_head(p):
        return not _input_side(p.name) or (tied and p.name.startswith("embed_tokens."))

    outside = [p for p in shape.params if p.layer is None and not _forward_only(p, tied)]
    layers = [big(p for p in shape.params if p.layer == i) for i in range(shape.layers)]
    head = big(p for p in outside if at_head(p))
    inputs = big(p for p in outside if not at_head(p))
    kept, after = 0, 0
    for numel in [head, *reversed(layers), inputs]:  # from the last used in the forward pass
        if 2 * after < s.max_reuse:
            kept += numel
        after += numel
    return max(0, after - kept)


def forward_only(shape: ModelShape, s: Setting) -> int:
    """Partitioned parameters gathered for the forward pass and released after it, with
    no backward to gather them for (_forward_only)."""
    tied = _tied(shape)
    return sum(p.numel for p in shape.params if p.numel > s.persistence and _forward_only(p, tied))


def _tied(shape: ModelShape) -> bool:
    return bool(getattr(shape.llama_config, "tie_word_embeddings", False))


def _forward_only(p, tied: bool) -> bool:
    """A frozen parameter of the input side, whose module's output needs no gradient
    (token ids in, or pixels: an untied embedding, the VAE, a LLaVA's vision encoder
    and projector), so ZeRO-3 never runs its backward hook. Not a tied embedding: it is
    the head too. The model must not read such a parameter from another module's
    forward, or ZeRO-3 holds it gathered until that module's backward
    (megafusion/model/fusion.py, forward)."""
    if p.trainable or p.layer is not None or (tied and p.name.startswith("embed_tokens.")):
        return False
    return _input_side(p.name) or p.name.startswith("understanding.")


def _input_side(name: str) -> bool:
    """Released after its forward use and gathered again, as the input side is: the whole
    image tokenizer, its predictor included, although the predictor runs after the last
    layer and a pipeline puts it on the last stage (shapes.py): DeepSpeed's two-rank
    gathers say so to the byte (tests/plan/test_plan.py, a U-Net patcher)."""
    return name.startswith(("embed_tokens.", "image_token_embed", "image_tokenizer."))


def zero3(shape: ModelShape, s: Setting, wl: Workload, world: int, gpus_per_node: int) -> dict:
    w, n = s.weight_bytes, world

    def held(p):  # a shard, plus the whole tensor when it is below the persistence threshold
        return part(p.numel, n) + (p.numel if p.numel <= s.persistence else 0)

    frozen = [p for p in shape.params if not p.trainable]
    trainable = [p for p in shape.params if p.trainable]
    t_part = sum(part(p.numel, n) for p in trainable)
    sizes = [p.numel for p in shape.params if p.numel > s.persistence]
    partitioned = sum(sizes)
    # The running layer and the prefetched ones, plus what stays gathered from the
    # forward pass until its backward (see regathered). The prefetch adds whole
    # parameters while it is under stage3_max_live_parameters (and the prefetch bucket),
    # so it can pass either by one parameter, at most the largest (the LM head of a
    # Llama 3: 1.05e9 elements at 70B); tests/plan/test_plan.py checks this against
    # DeepSpeed's own count.
    largest = max(sizes, default=0)
    kept = partitioned - regathered(shape, s) - forward_only(shape, s)
    gathered = min(max(s.max_live + largest, shape.layer_both_towers),
                   shape.layer_both_towers + s.prefetch_bucket + largest + kept, partitioned)
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


def zero2_gradient_buffer(shape: ModelShape, n: int) -> int:
    """Elements of ZeRO-1/2's reduced-gradient buffer on the rank that holds most.
    DeepSpeed flattens each optimizer parameter group, pads it to a multiple of 2N and
    gives rank r its r-th N-th; the buffer (grads_in_partition, stage_1_and_2.py) holds
    each parameter that overlaps that share whole, so a parameter cut by a share's end
    counts on both ranks: up to two parameters more than the share."""
    groups: dict[str, list[int]] = {}
    for p in shape.params:
        if p.trainable:
            groups.setdefault(p.group, []).append(p.numel)
    bounds = []
    for sizes in groups.values():
        size = -(-sum(sizes) // (2 * n)) * 2 * n // n
        starts = [0]
        for numel in sizes:
            starts.append(starts[-1] + numel)
        bounds.append((size, sizes, starts))
    return max(sum(numel for size, sizes, starts in bounds for numel, start in zip(sizes, starts)
                   if start < (r + 1) * size and start + numel > r * size) for r in range(n))


def zero2(shape: ModelShape, s: Setting, wl: Workload, world: int, gpus_per_node: int) -> dict:
    w, n = s.weight_bytes, world
    t_part = sum(part(p.numel, n) for p in shape.params if p.trainable)
    parts = {
        "frozen weights": w * shape.frozen,
        "trainable weights": w * shape.trainable,
        "gradients": w * zero2_gradient_buffer(shape, n),
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
    terms (params, grads, master, optimizer_state). ZeRO's 16-bit gradient partition
    lives across steps and its fp32 step gradient does not; under pipeline stages with
    bf16 it is the other way round: BF16_Optimizer's fp32 accumulation buffer stays,
    while the parameters' bf16 gradients live from a step's first backward to its end
    (the engine's _take_model_step ends with optimizer.zero_grad(), set_to_none)."""
    if s.pipeline_stages > 1 and parts["fp32 gradient (step)"]:
        grads = parts["fp32 gradient (step)"]
    else:
        grads = parts["gradients"]
    return {"params": parts["frozen weights"] + parts["trainable weights"], "grads": grads,
            "master": parts["master weights"], "optimizer_state": parts["optimizer states"]}
