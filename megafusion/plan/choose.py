"""The settings the planner weighs for a run, each evaluated, and the best that fits.

The global batch (sequences per optimizer step) is the run config's at the planned GPU
count: a setting may change the micro-batch and gradient accumulation, never what one
step trains on, so the settings are compared on the same optimisation.
"""
from __future__ import annotations

from dataclasses import dataclass

from megafusion.plan.hardware import GPU
from megafusion.plan.memory import memory
from megafusion.plan.quantized import qwz_refusal
from megafusion.plan.setting import Setting, Workload, workload
from megafusion.plan.shapes import ModelShape, PlanError
from megafusion.plan.step import StepEstimate, step_estimate

MICRO_BATCHES = (1, 2, 4, 8, 16)
# The workload's text tokens per image-caption document, and the kernels' share of peak
# FLOP/s, unless the caller says otherwise (tools/plan.py --caption-tokens, --efficiency).
CAPTION_TOKENS = 32
EFFICIENCY = 0.55
PIPELINE_STAGES = (2, 4, 8, 16, 32)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass
class Estimate:
    setting: Setting
    workload: Workload
    memory: dict
    fits: bool
    step: StepEstimate
    label: str = ""
    cannot_run: str = ""  # why this setting would fail on this cluster whatever its memory

    @property
    def runs(self) -> bool:
        return self.fits and not self.cannot_run

    @property
    def name(self) -> str:
        return self.label or self.setting.name


def configured_setting(cfg, world: int) -> Setting:
    """The setting the run config and its DeepSpeed JSON describe, at `world` GPUs."""
    from megafusion.config import ConfigError
    from megafusion.parallel.ds_config import deepspeed_config

    try:
        ds = deepspeed_config(cfg, world)
    except ConfigError as exc:
        raise PlanError(str(exc).splitlines()[0]) from None
    z = ds.get("zero_optimization", {})
    w = 4 if cfg.train.dtype == "fp32" else 2
    comm = DTYPE_BYTES.get(str(ds.get("communication_data_type", "")).lower(), w)
    accum = DTYPE_BYTES.get(str(ds.get("data_types", {}).get("grad_accum_dtype", "")).lower(), w)
    return Setting(zero_stage=int(cfg.parallel.zero_stage), pipeline_stages=int(cfg.parallel.pipeline_stages),
                   micro_batch=cfg.train.micro_batch_size, grad_accum=cfg.train.gradient_accumulation,
                   checkpointing=bool(cfg.model.activation_checkpointing),
                   prefetch_bucket=int(z.get("stage3_prefetch_bucket_size", 50_000_000)),
                   max_live=int(z.get("stage3_max_live_parameters", 1_000_000_000)),
                   max_reuse=int(z.get("stage3_max_reuse_distance", 1_000_000_000)),
                   persistence=int(z.get("stage3_param_persistence_threshold", 100_000)),
                   sub_group=int(z.get("sub_group_size", 1_000_000_000)),
                   reduce_bucket=int(z.get("reduce_bucket_size", 500_000_000)),
                   quantized_weights=bool(z.get("zero_quantized_weights", False)),
                   hpz=int(z.get("zero_hpz_partition_size", 1)), grad_comm_bytes=comm, grad_accum_bytes=accum,
                   weight_bytes=w)


def candidates(shape: ModelShape, configured: Setting, gpus_per_node: int, world: int) -> list[tuple[str, Setting]]:
    """The strategies weighed, before the micro-batch is chosen: ZeRO-3 with buckets that
    hold two layers of both towers (and with ZeRO++), ZeRO-2, pipeline + ZeRO-1. All
    reduce gradients in fp32 (at hundreds of ranks a bf16 ring sum loses the small
    gradients: each hop rounds to 8 bits of mantissa). Not weighed: ZeRO++'s int8 for
    frozen weights only (zero_quantized_nontrainable_weights), which quantizes nothing of
    this model (megafusion/parallel/preflight.py refuses it); qwZ where the world size
    leaves a partition that is not a multiple of 8 elements (megafusion/plan/quantized.py)."""
    layer = shape.layer_both_towers
    zero3 = configured.with_(zero_stage=3, pipeline_stages=1, prefetch_bucket=2 * layer, max_live=3 * layer,
                             max_reuse=3 * layer,
                             reduce_bucket=max(configured.reduce_bucket, layer // 2), grad_comm_bytes=4,
                             grad_accum_bytes=4, quantized_weights=False, hpz=1)
    hpz = min(gpus_per_node, world)
    qwz = not qwz_refusal(shape, world, zero3.persistence)
    out = [("ZeRO-3, two-layer buckets", zero3)]
    if qwz:
        out.append(("ZeRO-3 + qwZ", zero3.with_(quantized_weights=True)))
    if hpz > 1 and world > gpus_per_node:
        if qwz:
            out.append((f"ZeRO-3 + qwZ + hpZ {hpz}", zero3.with_(quantized_weights=True, hpz=hpz)))
        out.append((f"ZeRO-3 + hpZ {hpz}", zero3.with_(hpz=hpz)))
    out.append(("ZeRO-2", zero3.with_(zero_stage=2, grad_accum_bytes=configured.weight_bytes)))
    for p in PIPELINE_STAGES:
        if p <= shape.layers and world % p == 0 and world // p >= 1:
            out.append((f"pipeline {p} + ZeRO-1", zero3.with_(zero_stage=1, pipeline_stages=p)))
    return out


def evaluate(shape: ModelShape, s: Setting, world: int, gpus_per_node: int, g: GPU, *, seq_len: int,
             caption_tokens: int, efficiency: float, frozen_text: bool, label: str = "") -> Estimate:
    wl = workload(shape, s, seq_len, caption_tokens)
    mem = memory(shape, s, wl, world, gpus_per_node)
    step = step_estimate(shape, s, world, gpus_per_node, wl, g, efficiency, frozen_text)
    cannot = qwz_refusal(shape, world, s.persistence) if s.quantized_weights and s.zero_stage == 3 else ""
    return Estimate(s, wl, mem, mem["total"] <= g.usable, step, label, cannot)


def best_micro_batch(shape, s: Setting, global_seqs: int, world: int, gpus_per_node: int, g: GPU, label: str,
                     **kw) -> Estimate | None:
    """The fitting micro-batch (and the gradient accumulation that keeps the global batch)
    with the highest MFU; the smallest one's estimate when none fits. Micro-batches whose
    steps are compute-bound tie exactly (their traffic hides behind the same compute): the
    smallest of them wins, the one with the most memory to spare, as in choose_best. It
    may move more bytes (xfusion_1b's ZeRO-2 on one node: 2 x 48 moves 330 GB a step where
    16 x 6 moves 43 GB); a larger one would take headroom (8B's ZeRO-2: 58 -> 80 GB)."""
    replicas = world // s.pipeline_stages
    tried = []
    for mb in MICRO_BATCHES:
        if global_seqs % (mb * replicas):
            continue
        ga = global_seqs // (mb * replicas)
        if s.pipeline_stages > 1 and ga < s.pipeline_stages:
            continue  # fewer micro-batches than stages leaves most of the pipeline idle
        tried.append(evaluate(shape, s.with_(micro_batch=mb, grad_accum=ga), world, gpus_per_node, g, label=label, **kw))
    if not tried:
        return None
    fitting = [e for e in tried if e.runs]
    return max(fitting, key=lambda e: e.step.mfu) if fitting else tried[0]


def choose_best(estimates: list[Estimate], tie: float = 0.005) -> Estimate | None:
    """The fitting estimate with the highest MFU; within `tie` of it, exact weights
    (no qwZ: its forward runs on int8-rounded weights) and then less memory win."""
    fitting = [e for e in estimates if e.runs]
    if not fitting:
        return None
    top = max(e.step.mfu for e in fitting)
    near = [e for e in fitting if e.step.mfu >= top - tie]
    return min(near, key=lambda e: (e.setting.quantized_weights, e.setting.hpz > 1, e.memory["total"]))


def plan(cfg, shape: ModelShape, nodes: int, gpus_per_node: int, g: GPU, *, efficiency: float = EFFICIENCY,
         caption_tokens: int = CAPTION_TOKENS) -> dict:
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1")
    world = nodes * gpus_per_node
    if world % cfg.parallel.pipeline_stages:
        raise PlanError(f"{world} GPUs is not a multiple of parallel.pipeline_stages={cfg.parallel.pipeline_stages}")
    kw = dict(seq_len=cfg.data.seq_len, caption_tokens=caption_tokens, efficiency=efficiency,
              frozen_text=not cfg.model.train_text_tower)
    configured = configured_setting(cfg, world)
    global_seqs = configured.micro_batch * configured.grad_accum * (world // configured.pipeline_stages)
    as_configured = evaluate(shape, configured, world, gpus_per_node, g, label=f"as configured ({configured.name})", **kw)
    weighed = [e for label, s in candidates(shape, configured, gpus_per_node, world)
               if (e := best_micro_batch(shape, s, global_seqs, world, gpus_per_node, g, label, **kw)) is not None]
    best = choose_best([as_configured, *weighed])
    return {"world": world, "nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": g, "global_seqs": global_seqs,
            "configured": as_configured, "weighed": weighed, "best": best, "efficiency": efficiency,
            "caption_tokens": caption_tokens}
