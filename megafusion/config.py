"""Run configuration: YAML files in configs/ mapped onto typed dataclasses.

A run config has six sections, each a dataclass:

    run         where the run lives (run.dir: checkpoints/, tensorboard/, samples/, config.yaml)
    model       FusionConfig (megafusion/model/config.py)
    data        DataConfig (megafusion/data/config.py)
    train       optimisation: steps, batch sizes, learning rates and their schedule, precision
    parallel    ZeRO stage, pipeline stages, the DeepSpeed JSON to start from
    checkpoint  how often to save and how many to keep
    log         logging, tensorboard, samples, validation, MFU

    cfg = load_config("configs/tiny.yaml", ["train.steps=20", "train.betas=[0.9, 0.99]"])

Override values are parsed as YAML (`true`, `1e-4`, `[0.9, 0.95]`, `null`); a field typed
`str` takes the text as written. String values, in the file or on the command line, may
use `${VAR}` and `${VAR:-default}` (environment variables, as in a shell) and a leading
`~` (the home directory), which is what Slurm scripts and per-machine paths need; an
unset variable without a default is an error. A non-string field may be written as
`${VAR:-3}`: the expanded text is then parsed as YAML. Inside a YAML flow collection
(`[...]`, `{...}`) quote such strings: `["${A}/x"]`; override values are expanded before
they are parsed, so `data.train=[${A}, ${B}]` needs no quotes.

Every mistake (unknown key, wrong type, impossible combination) raises ConfigError with a
one-line message naming the key; nothing is guessed and nothing is silently ignored.

The typed-YAML machinery (expansion, coercion, overrides) is megafusion/typed_yaml.py.
The DeepSpeed JSON (parallel.ds_config) holds only engine tuning (bucket sizes,
prefetching, offload devices). Values the run config owns -- batch sizes, gradient
clipping, precision, ZeRO stage -- are filled in by megafusion/parallel/ds_config.py's
deepspeed_config() and must not be
written in the JSON; nor may an optimizer or scheduler be, since the trainer builds them
(parameter groups with separate learning rates for the two towers).
"""
from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megafusion.data.config import DataConfig
from megafusion.model.config import FusionConfig
from megafusion.typed_yaml import ConfigError, apply_override, build, config_to_dict, dump_yaml, expand, load_yaml, show

__all__ = ["ConfigError", "RunConfig", "load_config", "config_from_dict", "config_to_dict", "save_resolved",
           "lr_multiplier", "lr_at", "ds_config_path", "XFUSION_DESIGNS", "XFUSION_DEFAULTS"]

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    # The run directory: checkpoints/, tensorboard/, samples/ and config.yaml (the
    # resolved config the run used) go here.
    dir: str = "runs/default"
    name: str = "megafusion"
    seed: int = 0
    # "auto": continue from the checkpoint dir/checkpoints/latest names if there is one
    # (a `latest` naming a missing checkpoint is an error), else start fresh; "never":
    # start fresh, refusing a dir that has checkpoints. To start from another run's
    # checkpoint, copy its global_step<N> directory into dir/checkpoints and write
    # global_step<N> to dir/checkpoints/latest.
    resume: str = "auto"


@dataclass
class TrainSection:
    steps: int = 1000  # optimiser steps
    micro_batch_size: int = 1  # sequences per rank per forward/backward
    gradient_accumulation: int = 1  # micro-batches per optimiser step
    # Peak learning rate of everything trainable in the image tower (its copies of the
    # decoder layers and the patcher / U-Net parts trained from scratch).
    lr: float = 1e-4
    # Peak learning rate of the text tower; 0 with model.train_text_tower false (frozen),
    # as in LMFusion. It follows the same schedule shape as lr.
    text_lr: float = 0.0
    # Peak learning rate of model.patcher_layers' image-only blocks (trained from
    # scratch; DiT trains its blocks at 1e-4). At the demo's lr of 1e-3 they stalled its
    # diffusion loss (configs/demo.yaml). Same schedule shape as lr.
    patcher_layers_lr: float = 1e-4
    min_lr: float = 1.5e-5  # lr at the end of the decay (text tower: scaled alike)
    warmup_steps: int = 100  # linear warmup from ~0 to lr
    schedule: str = "cosine"  # after warmup: "cosine" | "linear" decay to min_lr, or "constant"
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    dtype: str = "bf16"  # "bf16" (mixed precision, fp32 master weights) or "fp32"
    # Consecutive optimiser steps with a NaN/Inf loss or gradient norm (skipped, not
    # applied) after which training stops with an error instead of burning compute.
    max_bad_steps: int = 5
    # The AdamW implementation: "auto" (DeepSpeed's CPU Adam when optimizer states are
    # offloaded, else torch's fused AdamW; megafusion/parallel/engine.py), "torch_fused",
    # "deepspeed_fused" (DeepSpeed's FusedAdam, CUDA), "apex_fused" (NVIDIA apex's
    # FusedAdam, CUDA, where installed) or "cpu_adam" (offloaded states only).
    optimizer: str = "auto"


@dataclass
class ParallelSection:
    # 3: parameters, gradients and optimizer states partitioned over data-parallel ranks
    # (frozen text tower kept as partitioned 16-bit shards). 1 or 0 with pipeline stages.
    zero_stage: int = 3
    # > 1 splits the decoder layers into pipeline stages (DeepSpeed's pipeline engine,
    # which supports ZeRO-1 only). World size must be a multiple of it.
    pipeline_stages: int = 1
    # Engine tuning JSON; relative paths resolve against the working directory, then the
    # repository root. Offloading optimizer states to the CPU is chosen here
    # (ds_configs/zero3_offload.json).
    ds_config: str = "ds_configs/zero3.json"
    # ZeRO-3 only: build the model already partitioned (transformers' zero.Init loading
    # of the base, image-tower twins partitioned one module at a time), so no rank ever
    # holds the whole model. Needed from ~8B up; small models start faster without it.
    zero_init: bool = False
    # Minutes a collective waits for its slowest rank before the process group raises
    # (with NCCL's async error handling the rank aborts): a hung or dead rank then ends
    # the job, which slurm/ requeues if it made progress, instead of idling every GPU
    # until the time limit. Longer than the slowest legitimate wait: ranks sit in a
    # barrier while the base model loads and while a 70B checkpoint is written.
    collective_timeout_minutes: float = 30.0
    # Stage 0 in fp32 only: gradients live in one flat buffer that is all-reduced in
    # place, instead of DeepSpeed flattening them into a copy and copying back
    # (megafusion/parallel/flat_grads.py); the same numbers, two fewer passes over them.
    flat_gradients: bool = True


@dataclass
class CheckpointSection:
    every: int = 1000  # optimiser steps between checkpoints; 0: only at the end and on a signal
    keep_last: int = 3  # checkpoints kept in run.dir/checkpoints; 0 keeps all


@dataclass
class LogSection:
    every: int = 10  # optimiser steps between log lines / scalars
    tensorboard: bool = True  # scalars under run.dir/tensorboard
    # Optimiser steps between sample images written to run.dir/samples; 0: never.
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle on a white background"])
    sample_diffusion_steps: int = 50
    sample_per_prompt: int = 2  # images per prompt (one grid row per prompt)
    sample_guidance: float = 3.0  # classifier-free guidance scale (1: none)
    # Held-out images (the first of data.val) captioned at each sample step; 0: none.
    sample_captions: int = 4
    sample_caption_tokens: int = 32
    # Synthetic shapes data only: at each sample point also score this many held-out
    # rows with tools/evaluate.py shapes' code (draw their captions, caption their
    # images), appended to run.dir/shapes_eval.jsonl and tensorboard shapes_eval/*;
    # tools/learning_curve.py plots them. 0: off.
    sample_eval_n: int = 0
    # ZeRO-3: "whole" gathers the model on every rank while sampling (fast), "module"
    # gathers one module at a time as it runs (never holds the whole model; 8B/70B),
    # "auto" picks whole up to 4 GiB of parameters (megafusion/parallel/sampling.py).
    sample_gather: str = "auto"
    # Optimiser steps between validation losses on data.val; 0: never.
    val_every: int = 0
    val_batches: int = 8  # micro-batches per rank in one validation pass
    # Peak dense FLOP/s of one device in the training dtype, for MFU (e.g. 989e12 for an
    # H100 SXM in bf16, 312e12 for an A100); 0: MFU is not reported.
    peak_flops_per_device: float = 0.0


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: FusionConfig = field(default_factory=FusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        for section in (self.model, self.data):
            if hasattr(section, "validate"):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as exc:
                    raise ConfigError(str(exc).splitlines()[0]) from None
        _validate_run(self)


CHOICES = {
    "train.schedule": ("cosine", "linear", "constant"),
    "train.dtype": ("bf16", "fp32"),
    "train.optimizer": ("auto", "torch_fused", "deepspeed_fused", "apex_fused", "cpu_adam"),
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_run(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, f"{key}={value!r}: expected one of {', '.join(allowed)}")

    r, t, p, c, lg = cfg.run, cfg.train, cfg.parallel, cfg.checkpoint, cfg.log
    _check(bool(r.dir), "run.dir is empty; it names the run directory")
    _check(r.seed >= 0, f"run.seed={r.seed}: must be >= 0")
    _check(r.resume in ("auto", "never"),
           f"run.resume={r.resume!r}: expected auto or never (to start from another run's checkpoint, copy its "
           "global_step<N> directory into run.dir/checkpoints and write global_step<N> to run.dir/checkpoints/latest)")

    def need(ok: bool, name: str, rule: str) -> None:
        _check(ok, f"train.{name}={getattr(t, name)!r}: {rule}")

    for name in ("steps", "micro_batch_size", "gradient_accumulation", "max_bad_steps"):
        need(getattr(t, name) >= 1, name, "must be >= 1")
    need(t.lr > 0, "lr", "must be > 0 (the image tower is what trains)")
    need(t.text_lr >= 0, "text_lr", "must be >= 0")
    need(t.patcher_layers_lr > 0, "patcher_layers_lr", "must be > 0")
    need(0 <= t.min_lr <= t.lr, "min_lr", "must be in [0, train.lr]")
    need(t.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(all(0 <= b < 1 for b in t.betas), "betas", "each must be in [0, 1)")
    need(t.eps > 0, "eps", "must be > 0")
    need(t.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(t.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
    if cfg.model.train_text_tower:
        _check(t.text_lr > 0, "model.train_text_tower=true needs train.text_lr > 0 (it is 0)")
    else:
        _check(t.text_lr == 0, f"train.text_lr={t.text_lr} but model.train_text_tower=false (the text tower is frozen); set one or the other")

    _check(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={p.zero_stage}: expected 0, 1, 2 or 3")
    _check(p.pipeline_stages >= 1, f"parallel.pipeline_stages={p.pipeline_stages}: must be >= 1")
    _check(p.pipeline_stages == 1 or not cfg.model.align_encoder,
           "model.align_encoder with parallel.pipeline_stages > 1: the align layer's hidden states live on a middle "
           "stage, which has no loss; train with ZeRO instead")
    _check(
        p.pipeline_stages == 1 or p.zero_stage <= 1,
        f"parallel.pipeline_stages={p.pipeline_stages} needs parallel.zero_stage <= 1 (DeepSpeed's pipeline engine "
        f"supports ZeRO-1 only, parallel.zero_stage={p.zero_stage}); use ds_configs/pipeline_zero1.json with "
        "parallel.zero_stage=1, or set parallel.pipeline_stages=1 for ZeRO-3",
    )
    ds_config_path(cfg)  # exists and is readable
    _check(p.collective_timeout_minutes > 0,
           f"parallel.collective_timeout_minutes={p.collective_timeout_minutes}: must be > 0")

    _check(c.every >= 0, f"checkpoint.every={c.every}: must be >= 0 (0: only at the end)")
    _check(c.keep_last >= 0, f"checkpoint.keep_last={c.keep_last}: must be >= 0 (0 keeps all)")
    _check(lg.every >= 1, f"log.every={lg.every}: must be >= 1")
    for key in ("sample_every", "val_every"):
        _check(getattr(lg, key) >= 0, f"log.{key}={getattr(lg, key)}: must be >= 0 (0: never)")
    _check(lg.sample_diffusion_steps >= 1, f"log.sample_diffusion_steps={lg.sample_diffusion_steps}: must be >= 1")
    _check(lg.sample_per_prompt >= 1, f"log.sample_per_prompt={lg.sample_per_prompt}: must be >= 1")
    _check(lg.sample_gather in ("auto", "whole", "module"), f"log.sample_gather={lg.sample_gather!r}: expected auto, whole or module")
    _check(lg.sample_captions >= 0, f"log.sample_captions={lg.sample_captions}: must be >= 0")
    _check(lg.sample_eval_n >= 0, f"log.sample_eval_n={lg.sample_eval_n}: must be >= 0")
    _check(lg.sample_caption_tokens >= 1, f"log.sample_caption_tokens={lg.sample_caption_tokens}: must be >= 1")
    _check(not lg.sample_every or lg.sample_prompts, "log.sample_every > 0 needs at least one log.sample_prompts entry")
    _check(lg.val_batches >= 1, f"log.val_batches={lg.val_batches}: must be >= 1")
    _check(lg.peak_flops_per_device >= 0, f"log.peak_flops_per_device={lg.peak_flops_per_device}: must be >= 0")


# --------------------------------------------------------------------------- loading


def config_from_dict(data: dict | None, overrides: typing.Iterable[str] = (), *, source: str | None = None) -> RunConfig:
    """A validated RunConfig from a dict (the parsed YAML) and `section.field=value` overrides."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'run config'}: expected a mapping of sections (run, model, data, ...), got {type(data).__name__}")
    explicit: set[str] = set()
    try:
        for section, value in data.items():
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key {section}: a section must be a mapping of fields, got {show(value)}")
        cfg = build(RunConfig, {k: (v or {}) for k, v in data.items()}, "", explicit)
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None
    for text in overrides:
        apply_override(cfg, text, explicit)
    _fill_design_defaults(cfg, explicit)
    _fill_derived(cfg, explicit)
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Read a YAML run config, apply `section.field=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read run config ({exc.strerror or type(exc).__name__})") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return config_from_dict(data, overrides, source=str(path))


# X-Fusion's recipe (Mo et al.), the defaults of a run whose model.tower_mode is one of
# the designs its paper compares: a key the config or an override sets keeps its value.
# tools/ablate.py pins them to the config's own values so that designs differ in design only.
XFUSION_DESIGNS = ("dual_tower", "xfuse", "single_tower", "gated_tower")
XFUSION_DEFAULTS = {
    "model.objective": "rectified_flow",      # SD3-style rectified flow
    "model.patcher": "linear",                # trainable linear patchify
    "model.patch_size": 2,                    # 2x2 patches
    "model.lm_loss_weight": 0.2,              # 0.2 x AR
    "model.diffusion_loss_weight": 1.0,       # + 1.0 x diffusion
    "model.condition_clean_share": 1.0,       # clean images for understanding samples
    "data.generation_ratio": 0.667,           # generation:understanding 2:1
}


def _fill_design_defaults(cfg: RunConfig, explicit: set) -> None:
    if cfg.model.tower_mode not in XFUSION_DESIGNS:
        return
    for key, value in XFUSION_DEFAULTS.items():
        if key not in explicit:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)


# Fields of other sections that the run config derives from its own, so that each value
# is written once: {derived key: owning key}.
DERIVED = {
    "data.batch_size": "train.micro_batch_size",
}


def _fill_derived(cfg: RunConfig, explicit: set) -> None:
    for derived, owner in DERIVED.items():
        section, name = derived.split(".")
        target = getattr(cfg, section)
        if not hasattr(target, name):
            continue
        if derived in explicit:
            raise ConfigError(f"config key {derived} is set from {owner}; set {owner} instead")
        o_section, o_name = owner.split(".")
        setattr(target, name, getattr(getattr(cfg, o_section), o_name))


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config (environment expanded, overrides applied, derived values
    filled) as YAML; load_config() of that file gives the same RunConfig."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    for derived in DERIVED:  # written once: the owner's value regenerates it
        section, name = derived.split(".")
        data.get(section, {}).pop(name, None)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("# Resolved run config (what this run used); load with megafusion.config.load_config.\n")
        dump_yaml(data, f)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- learning rate


def lr_multiplier(step: int, train: TrainSection) -> float:
    """Factor on each parameter group's peak lr for 0-based optimiser step `step`.

    Linear warmup (step+1)/warmup_steps, then decay from 1 to min_lr/lr over the
    remaining steps: at step == train.steps the image tower is at min_lr and the text
    tower at text_lr * min_lr / lr (the same shape). Fits torch's LambdaLR.
    """
    if train.warmup_steps > 0 and step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    if train.schedule == "constant":
        return 1.0
    floor = train.min_lr / train.lr
    progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    if train.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if train.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    raise ConfigError(f"train.schedule={train.schedule!r}: expected one of {', '.join(CHOICES['train.schedule'])}")


def lr_at(step: int, train: TrainSection, peak: float | None = None) -> float:
    """Learning rate at optimiser step `step` for a group whose peak is `peak`
    (default train.lr, the image tower; pass train.text_lr for the text tower)."""
    return (train.lr if peak is None else peak) * lr_multiplier(step, train)


# --------------------------------------------------------------------------- DeepSpeed JSON


def ds_config_path(cfg: RunConfig) -> Path:
    name = cfg.parallel.ds_config
    path = Path(expand(name, "parallel.ds_config"))
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"parallel.ds_config={name}: no such file (looked in {', '.join(str(c) for c in candidates)})")


