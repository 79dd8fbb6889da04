"""Communication per step by kind, and a step time and MFU from stated bandwidths.

Bytes are what one GPU receives (ring all-gather and reduce-scatter: (n - 1) / n of the
buffer; an all-reduce twice that). A collective over more GPUs than a node holds runs at
the network's per-GPU bandwidth, one inside a node at NVLink's (megafusion/plan/hardware.py).

- ZeRO-3 gathers every partitioned weight (both towers: the frozen one is partitioned
  too) in the forward pass and again in the backward pass of every micro-batch (with
  activation checkpointing the recompute's gather serves the backward: the decoder layer
  starts its backward with the recompute, see towers.DecoderLayer.forward; before, ZeRO-3
  released the frozen tower after the recompute and gathered it a third time), and
  reduce-scatters the trainable gradients every micro-batch; the frozen tower has no
  gradient. ZeRO++: qwZ gathers int8 weights (1 byte, its scales are <1%), hpZ keeps a
  second 16-bit copy of the shards split over hpz GPUs of a node, and gathers from it
  inside the node whenever it exists. DeepSpeed (0.19) drops the trainable weights'
  copy after each optimizer step (their values changed) and makes it again as each is
  released, while the frozen tower's is made at start-up and never dropped: across
  nodes a step gathers the trainable weights once (the first micro-batch's forward)
  and the frozen tower never; every other gather of the step runs inside the node,
  int8 too under qwZ (DeepSpeed quantizes the gathers from the copy alike).
- ZeRO-2 all-reduces its gradient buckets every micro-batch (DeepSpeed's default,
  zero_optimization.use_multi_rank_bucket_allreduce: each bucket is all-reduced and each
  rank keeps its partition, twice a reduce-scatter's bytes) and all-gathers the updated
  16-bit trainable weights once per step.
- Pipeline + ZeRO-1 sends each micro-batch's activations forward and their gradients
  back across each stage boundary (pipeline_messages: what megafusion/parallel/pipeline.py
  puts on the wire; the busiest stage receives both directions, or with two stages the
  larger), all-reduces a stage's fp32 gradients over its replicas once per step and
  all-gathers the updated weights.

Time: compute = hardware FLOPs (model FLOPs of megafusion/flops.py plus the recomputed
forward under activation checkpointing) / (peak x efficiency); ZeRO's prefetch and
overlap_comm hide communication behind compute, so a ZeRO step takes max(compute,
communication) plus what cannot overlap (ZeRO-2's weight gather after the step, the
optimizer step); a pipeline step takes (micro-batches + stages - 1) slots of its slowest
stage plus its blocking sends, its gradient all-reduce and the optimizer step. MFU =
model FLOPs / (step time x peak), counting the frozen tower's missing weight gradients
(megafusion/flops.py FORMULA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megafusion.flops import patcher_forward_flops_per_image, train_step_flops
from megafusion.plan.hardware import GPU
from megafusion.plan.memory import regathered
from megafusion.plan.setting import Setting, Workload, ring
from megafusion.plan.shapes import ModelShape, stage_layers

OPTIMIZER_BYTES_PER_PARAM = 34  # AdamW step: read+write master and m, v (24), read grad (4), write 16-bit weight (2), read lr terms


@dataclass
class Flops:
    model: float      # per micro-batch, the whole model (what MFU counts)
    hardware: float   # plus the recomputed forward
    layer_model: float
    layer_hardware: float
    head: float
    unet: float


def unet_forward_flops(shape: ModelShape, images: int) -> float:
    """The image tokenizer's forward FLOPs for `images` images (megafusion/flops.py)."""
    shapes = [(p.name[len("image_tokenizer."):], p.shape) for p in shape.params if p.name.startswith("image_tokenizer.")]
    return images * patcher_forward_flops_per_image(shapes, shape.latent[1:], shape.tokens_per_image)


def micro_batch_flops(shape: ModelShape, wl: Workload, s: Setting, frozen_text: bool) -> Flops:
    cfg = shape.llama_config
    counts = dict(text_tokens=wl.text_tokens, logit_tokens=wl.logit_tokens, attention_pairs=wl.attention_pairs,
                  image_tokens=wl.image_tokens, tower_mode=shape.tower_mode)
    parts = train_step_flops(cfg, frozen_text=frozen_text, image_io=3 * unet_forward_flops(shape, wl.images), **counts)
    layers = parts["layers"] + parts["attention"]
    recompute = 0.0
    if s.checkpointing:
        # The layers' forward again: every matmul costs 6 x weights with all of it trainable, 2 x forward.
        recompute = train_step_flops(cfg, frozen_text=False, **counts)["layers"] / 3
        recompute += parts["attention"] / 3  # forward: 4d of the 12d per pair
    return Flops(model=parts["total"], hardware=parts["total"] + recompute,
                 layer_model=layers / shape.layers, layer_hardware=(layers + recompute) / shape.layers,
                 head=parts["lm_head"], unet=parts["image_io"])


@dataclass
class Traffic:
    kind: str
    bytes: float     # per GPU per step
    link: str        # "network" or "nvlink"
    overlapped: bool


@dataclass
class StepEstimate:
    compute_s: float
    comm_s: float
    step_s: float
    mfu: float
    tokens_per_s_per_gpu: float
    traffic: list = field(default_factory=list)


# DeepSpeed's pipeline engine with dynamic_shape sends a tensor-metadata buffer before
# each micro-batch's activations (runtime/pipe/engine.py: TENSOR_META_SIZE int32). Not
# imported from there: that module takes seconds to import, and the planner runs on
# laptops; tests/plan/test_plan.py holds the two equal.
PIPELINE_META_BYTES = 256 * 4


def pipeline_messages(shape: ModelShape, wl: Workload, act_bytes: int) -> tuple[int, int]:
    """Bytes one micro-batch puts on a stage boundary: (forward, backward).

    Forward, the tuple every stage after the first emits (megafusion/parallel/pipeline.py
    EmbedStage.forward): the hidden states; modality, document ids, image ids and LM
    targets as int64 per token; the RoPE positions (int64, three streams under
    image_rope=2d); the diffusion target in fp32 per image (twice, with x_t, where the
    velocity needs it), its shape and the timesteps; the metadata buffer. Backward: the
    gradient of the hidden states, the one floating-point tensor among them."""
    hidden = wl.tokens * shape.hidden * act_bytes
    per_token = (4 + shape.rope_streams) * 8
    per_image = math.prod(shape.latent) * 4 * shape.target_copies + 4
    forward = hidden + wl.tokens * per_token + wl.images * per_image + 4 * 8 + PIPELINE_META_BYTES
    return forward, hidden


def _link(group: int, gpus_per_node: int) -> str:
    return "nvlink" if group <= gpus_per_node else "network"


def traffic(shape: ModelShape, s: Setting, world: int, gpus_per_node: int, wl: Workload) -> list[Traffic]:
    w, ga, n = s.weight_bytes, s.grad_accum, world
    trainable = shape.trainable
    if s.pipeline_stages > 1:
        stages, replicas = s.pipeline_stages, world // s.pipeline_stages
        stage_t = max(sum(p.numel for p in shape.stage_params(i, stages) if p.trainable) for i in range(stages))
        # Ranks of a stage are consecutive (DeepSpeed's pipe-major topology): its replicas
        # share a node when they fit in one, and stage boundaries then cross nodes.
        boundary = "network" if replicas * 2 > gpus_per_node else "nvlink"
        return [
            Traffic("activations + their gradients (p2p)", ga * _busiest_boundary(shape, wl, w, stages), boundary,
                    False),
            Traffic("gradient all-reduce", 2 * ring(replicas) * stage_t * s.grad_comm_bytes,
                    _link(replicas, gpus_per_node), False),
            Traffic("weight all-gather (after the step)", ring(replicas) * stage_t * w, _link(replicas, gpus_per_node),
                    False),
        ]
    if s.zero_stage == 2:
        grads = Traffic("gradient all-reduce", ga * 2 * ring(n) * trainable * s.grad_comm_bytes,
                        _link(n, gpus_per_node), True)
        return [grads, Traffic("weight all-gather (after the step)", ring(n) * trainable * w, _link(n, gpus_per_node),
                               False)]
    grads = Traffic("gradient reduce-scatter", ga * ring(n) * trainable * s.grad_comm_bytes, _link(n, gpus_per_node), True)
    gathered = sum(p.numel for p in shape.params if p.numel > s.persistence)
    again = regathered(shape, s)
    fwd_bytes = 1 if s.quantized_weights else w
    if s.hpz > 1:
        fresh = sum(p.numel for p in shape.params if p.trainable and p.numel > s.persistence)
        return [Traffic("weight all-gather (trainable, once per step)", ring(n) * fresh * fwd_bytes,
                        _link(n, gpus_per_node), True),
                Traffic("weight all-gather (hpZ, inside the node)",
                        ring(s.hpz) * (ga * (gathered + again) - fresh) * fwd_bytes, _link(s.hpz, gpus_per_node), True),
                grads]
    return [Traffic("weight all-gather (forward)", ga * ring(n) * gathered * fwd_bytes, _link(n, gpus_per_node), True),
            Traffic("weight all-gather (backward)", ga * ring(n) * again * fwd_bytes, _link(n, gpus_per_node), True),
            grads]


def _busiest_boundary(shape: ModelShape, wl: Workload, act_bytes: int, stages: int) -> int:
    """Bytes per micro-batch the busiest stage receives: a middle stage both directions;
    with two stages the first receives gradients and the last activations."""
    forward, backward = pipeline_messages(shape, wl, act_bytes)
    return forward + backward if stages > 2 else max(forward, backward)


def _seconds(t: Traffic, g: GPU) -> float:
    return t.bytes / (g.nvlink if t.link == "nvlink" else g.network)


def step_estimate(shape: ModelShape, s: Setting, world: int, gpus_per_node: int, wl: Workload, g: GPU,
                  efficiency: float, frozen_text: bool) -> StepEstimate:
    f = micro_batch_flops(shape, wl, s, frozen_text)
    flops_s = g.peak * efficiency
    kinds = traffic(shape, s, world, gpus_per_node, wl)
    hidden = sum(_seconds(t, g) for t in kinds if t.overlapped)
    exposed = sum(_seconds(t, g) for t in kinds if not t.overlapped)
    if s.pipeline_stages > 1:
        stages, replicas = s.pipeline_stages, world // s.pipeline_stages
        slot = max(_stage_flops(shape, f, i, stages) for i in range(stages)) / flops_s
        compute = (s.grad_accum + stages - 1) * slot
        stage_t = max(sum(p.numel for p in shape.stage_params(i, stages) if p.trainable) for i in range(stages))
        optimizer = stage_t / replicas * OPTIMIZER_BYTES_PER_PARAM / g.hbm
        step = compute + exposed + optimizer
        model_per_gpu = s.grad_accum * f.model / stages
    else:
        compute = s.grad_accum * f.hardware / flops_s
        optimizer = shape.trainable / world * OPTIMIZER_BYTES_PER_PARAM / g.hbm
        step = max(compute, hidden) + exposed + optimizer
        model_per_gpu = s.grad_accum * f.model
    return StepEstimate(compute_s=compute, comm_s=hidden + exposed, step_s=step,
                        mfu=model_per_gpu / (step * g.peak),
                        tokens_per_s_per_gpu=s.grad_accum * wl.tokens / step / s.pipeline_stages, traffic=kinds)


def _stage_flops(shape: ModelShape, f: Flops, stage: int, stages: int) -> float:
    lo, hi = stage_layers(shape.layers, stage, stages)
    work = (hi - lo) * f.layer_hardware
    if stage == 0:
        work += f.unet / 2
    if stage == stages - 1:
        work += f.head + f.unet / 2
    return work
