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

The DeepSpeed JSON (parallel.ds_config) holds only engine tuning (bucket sizes,
prefetching, offload devices). Values the run config owns -- batch sizes, gradient
clipping, precision, ZeRO stage -- are filled in by deepspeed_config() and must not be
written in the JSON; nor may an optimizer or scheduler be, since the trainer builds them
(parameter groups with separate learning rates for the two towers).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megafusion.data.config import DataConfig
from megafusion.model.config import FusionConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A bad run config; the message is one line naming the offending key."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    # The run directory: checkpoints/, tensorboard/, samples/ and config.yaml (the
    # resolved config the run used) go here.
    dir: str = "runs/default"
    name: str = "megafusion"
    seed: int = 0
    # "auto": continue from the latest checkpoint in dir/checkpoints if there is one,
    # else start fresh; "never": always start fresh (refuses a dir that has checkpoints);
    # or the path of a checkpoint directory to start from.
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

    def need(ok: bool, name: str, rule: str) -> None:
        _check(ok, f"train.{name}={getattr(t, name)!r}: {rule}")

    for name in ("steps", "micro_batch_size", "gradient_accumulation", "max_bad_steps"):
        need(getattr(t, name) >= 1, name, "must be >= 1")
    need(t.lr > 0, "lr", "must be > 0 (the image tower is what trains)")
    need(t.text_lr >= 0, "text_lr", "must be >= 0")
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




# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float (PyYAML's YAML 1.1 resolver wants a dot)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, rx) for tag, rx in _resolvers if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    # A key written twice is a mistake that PyYAML would silently resolve to the last.
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} written twice", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------- expansion

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def expand(value: str, key: str = "") -> str:
    """`${VAR}`, `${VAR:-default}` (default if unset or empty), `${VAR-default}` (if
    unset) and a leading `~`, as a shell would expand them."""

    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3)
        current = os.environ.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        if current is None:
            where = f"config key {key}: " if key else ""
            raise ConfigError(f"{where}environment variable {name} is not set (written {m.group(0)}; use ${{{name}:-default}} for a default)")
        return current

    out = _ENV.sub(sub, value)
    if out == "~" or out.startswith("~/"):
        out = os.path.expanduser(out)
    return out


# --------------------------------------------------------------------------- typing


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in typing.get_args(tp):
            return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "mapping (section)"
    return getattr(tp, "__name__", str(tp))


def _accepts_str(tp) -> bool:
    if tp is str or tp is typing.Any:
        return True
    return _is_union(tp) and any(_accepts_str(a) for a in typing.get_args(tp))


class _Mismatch(Exception):
    pass


def _coerce(value, tp, key: str, explicit: set | None = None):
    """`value` (from YAML) as type `tp`, or ConfigError naming `key`."""
    if isinstance(value, str):
        expanded = expand(value, key)
        if expanded != value and not _accepts_str(tp):
            expanded = _yaml_load(expanded) if expanded.strip() else None
        value = expanded
    try:
        return _convert(value, tp, key, explicit)
    except _Mismatch:
        raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {_show(value)}") from None


def _show(value) -> str:
    text = repr(value) if not isinstance(value, (list, tuple, dict)) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _expand_tree(value, key: str):
    """Expand the strings inside an untyped value (model.extra, data.train's stream list)."""
    if isinstance(value, str):
        return expand(value, key)
    if isinstance(value, dict):
        return {k: _expand_tree(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_expand_tree(v, f"{key}[{i}]") for i, v in enumerate(value))
    return value


def _convert(value, tp, key, explicit):
    if tp is typing.Any:
        return _expand_tree(value, key)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # Prefer an arm the value already is (so 1 stays an int in int | float).
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: not _is_instance(value, a))
        nested_error = None
        for arm in ordered:
            try:
                return _convert(value, arm, key, explicit)
            except _Mismatch:
                continue
            except ConfigError as exc:  # the right shape, wrong inside: that error says more
                if nested_error is None and _is_instance(value, arm):
                    nested_error = exc
        if nested_error is not None:
            raise nested_error
        raise _Mismatch
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, key, explicit)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return _expand_tree(list(value), key)
        return [_coerce(v, args[0], f"{key}[{i}]", explicit) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        args = typing.get_args(tp)
        if not args:
            return _expand_tree(dict(value), key)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # steps: 1e5
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # name: 2024
            return str(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def _is_instance(value, tp) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return isinstance(origin, type) and isinstance(value, origin)


def _unknown(key: str, valid) -> ConfigError:
    return ConfigError(f"unknown config key {key} (valid: {', '.join(valid)})")


def _build(cls, data: dict, prefix: str, explicit: set | None):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown(key, names)
        kwargs[name] = _coerce(value, hints[name], key, explicit)
        if explicit is not None and not dataclasses.is_dataclass(hints[name]):
            explicit.add(key)
    return cls(**kwargs)


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
                raise ConfigError(f"config key {section}: a section must be a mapping of fields, got {_show(value)}")
        cfg = _build(RunConfig, {k: (v or {}) for k, v in data.items()}, "", explicit)
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None
    for text in overrides:
        _apply_override(cfg, text, explicit)
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
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    return config_from_dict(data, overrides, source=str(path))


def _apply_override(cfg: RunConfig, text: str, explicit: set) -> None:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    raw = expand(raw, key)  # before parsing, as a shell would: `x=[${A}, ${B}]` works
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: expected section.field=value")
    if len(parts) == 1:
        if parts[0] in [f.name for f in dataclasses.fields(RunConfig)]:
            raise ConfigError(f"override {text!r}: {parts[0]} is a section; set {parts[0]}.<field>=value")
        raise _unknown(key, [f.name for f in dataclasses.fields(RunConfig)])
    obj = cfg
    for depth, name in enumerate(parts):
        sub = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(obj, dict):  # free-form mapping such as model.extra
            if last:
                obj[name] = _coerce(_parse_value(raw, text), typing.Any, key)
                break
            obj = obj.setdefault(name, {})
            if not isinstance(obj, dict):
                raise ConfigError(f"override {text!r}: {sub} is not a mapping")
            continue
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:depth])} is not a section")
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            raise _unknown(sub, names)
        tp = _hints(type(obj))[name]
        if last:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {text!r}: {sub} is a section; set {sub}.<field>=value")
            if _accepts_str(tp) and raw.strip().lower() not in ("null", "none", "~", ""):
                value = raw if tp is str or _is_plain_str(raw) else _parse_value(raw, text)
            else:
                value = _parse_value(raw, text)
            setattr(obj, name, _coerce(value, tp, key))
            explicit.add(key)
        else:
            obj = getattr(obj, name)


def _parse_value(raw: str, text: str):
    if not raw.strip():
        return None
    try:
        return _yaml_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None


def _is_plain_str(raw: str) -> bool:
    """True when `raw` is meant as text for a field that also takes other types: it does
    not parse as a YAML list or mapping."""
    try:
        return not isinstance(_yaml_load(raw), (list, dict))
    except yaml.YAMLError:
        return True


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


# --------------------------------------------------------------------------- saving


def config_to_dict(cfg) -> dict:
    """Plain dict (lists, not tuples) of a config or section, ready for YAML or JSON."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections and mappings in block style, lists of scalars on one line."""


def _represent_list(dumper, value):
    flow = all(not isinstance(v, (list, tuple, dict)) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, lambda dumper, value: dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=False))


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
        yaml.dump(data, f, Dumper=_Dumper, sort_keys=False, width=100)
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


# --------------------------------------------------------------------------- DeepSpeed

# JSON keys (dotted paths) the run config owns: {path: run-config key that sets it}.
DS_OWNED = {
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation x data-parallel size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "train.dtype",
    "bfloat16.enabled": "train.dtype",
    "fp16.enabled": "train.dtype",
    "zero_optimization.stage": "parallel.zero_stage",
    "optimizer": "train.lr/betas/eps/weight_decay (the trainer builds the optimizer)",
    "scheduler": "train.warmup_steps/schedule/min_lr (the trainer builds the schedule)",
}


def ds_config_path(cfg: RunConfig) -> Path:
    name = cfg.parallel.ds_config
    path = Path(expand(name, "parallel.ds_config"))
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"parallel.ds_config={name}: no such file (looked in {', '.join(str(c) for c in candidates)})")


def _get_path(d: dict, dotted: str):
    node = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _strip_comments(value):
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_strip_comments(v) for v in value]
    return value


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config dict: parallel.ds_config with the run config's values filled in.

    `world_size` is the total number of ranks; the data-parallel size is world_size /
    parallel.pipeline_stages. Keys starting with "_" (comments) are dropped.
    """
    path = ds_config_path(cfg)
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid DeepSpeed JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for key, owner in DS_OWNED.items():
        if _get_path(raw, key) is not None:
            raise ConfigError(f"{path}: {key} is filled in from the run config ({owner}); remove it from the JSON")

    p, t = cfg.parallel, cfg.train
    if world_size < 1 or world_size % p.pipeline_stages:
        raise ConfigError(f"world size {world_size} is not a multiple of parallel.pipeline_stages={p.pipeline_stages}")
    data_parallel = world_size // p.pipeline_stages

    ds = _strip_comments(copy.deepcopy(raw))
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation
    ds["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation * data_parallel
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": p.zero_stage}
    # The trainer logs; DeepSpeed's own per-step prints would only duplicate it.
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds


def optimizer_offloaded(ds: dict) -> bool:
    """Whether a (filled-in) DeepSpeed config keeps optimizer states on the CPU; the
    trainer then builds DeepSpeedCPUAdam rather than torch.optim.AdamW."""
    device = _get_path(ds, "zero_optimization.offload_optimizer.device")
    return device not in (None, "none")


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen
