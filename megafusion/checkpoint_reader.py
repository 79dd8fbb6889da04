"""From a training checkpoint to the fused model: finding the checkpoint of a run,
reading its trainable weights and loading them onto a model built from the run's config.
megafusion/export.py (the Hugging Face directory), megafusion/export_stream.py (the
streamed export) and megafusion/generate.py read checkpoints through this.

What the trainer writes (megafusion/parallel/checkpoint.py) and how it is read back:
- ZeRO (stage 3, or 1/2 without pipeline stages): DeepSpeed's partitioned optimizer
  files, consolidated by deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
  (fp32 master weights, keys are LMFusionModel's parameter names).
- Stage 0 (DeepSpeed's plain data parallelism, the CPU demo's setting): one
  mp_rank_00_model_states.pt whose `module` holds the weights the engine ran (fp32 on
  the CPU); with tied embeddings it also names the frozen head, which is dropped here
  (it comes from the base). In a bf16/fp16 run those are 16-bit and the fp32 masters
  are in its `optimizer` entry (DeepSpeed's FP16 optimizer wrappers: fp32_groups, or
  fp32_groups_flat, one per parameter group): plain_masters reads them instead.
- Pipeline + ZeRO-1: one layer_XX-model_states.pt per PipelineModule layer, read with
  the loader DeepSpeed's PipelineModule.load_state_dir uses (SDLoaderFactory); layer 0
  is the embed stage, 1..N the decoder layers, N+1 the head stage, whose own copy of the
  BOI/EOI logit rows (image_token_head) the exported model keeps. These files hold the
  module's own weights (what the pipeline engine ran: bf16 in a bf16 run). The fp32
  masters are in the optimizer files, one per (replica, stage), each stage's flat fp32
  groups partitioned over its replicas: PipelineMasters reads them.
Checkpoints hold trainable parameters only (exclude_frozen_parameters): the frozen text
tower comes from the base model the run config names, as at every training start. Every
trainable parameter of the model must come from the checkpoint and every checkpoint
tensor must land on one (names and shapes checked), so a checkpoint of another model
configuration is refused rather than half-loaded.

Every failure a user can cause is an ExportError with a one-line message.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
OPTIM_FILE_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
PLAIN_FILE = "mp_rank_00_model_states.pt"  # stage 0: model and optimizer in one file


class ExportError(ValueError):
    """A checkpoint, base model or output directory that cannot be used (one line)."""


# ------------------------------------------------------------------------ locating

@dataclass
class CheckpointRef:
    run_dir: Path
    ckpt_dir: Path
    tag: str
    kind: str  # "zero", "plain" (stage 0) or "pipeline"

    @property
    def tag_dir(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def step(self) -> int | None:
        m = re.match(r"^global_step(\d+)$", self.tag)
        return int(m.group(1)) if m else None


def _kind(tag_dir: Path) -> str | None:
    names = [p.name for p in tag_dir.iterdir()] if tag_dir.is_dir() else []
    if any(LAYER_FILE_RE.match(n) for n in names):
        return "pipeline"
    if any(n.endswith("_optim_states.pt") for n in names) and any(n.endswith("model_states.pt") for n in names):
        return "zero"
    if PLAIN_FILE in names:
        return "plain"
    return None


def _is_ckpt_dir(p: Path) -> bool:
    return (p / "latest").is_file() or any(d.is_dir() and d.name.startswith("global_step") for d in p.iterdir())


def find_checkpoint(path: str | os.PathLike, tag: str | None = None) -> CheckpointRef:
    """A run directory, its checkpoints/ directory or one tag directory -> the checkpoint
    to read: `tag`, else the one `latest` names (written only once every rank finished)."""
    from megafusion.parallel.checkpoint import read_latest

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ExportError(f"{path}: no such directory")
    if (p / "checkpoints").is_dir():
        ckpt_dir = p / "checkpoints"
    elif _kind(p) is not None:  # a tag directory
        if tag is not None and tag != p.name:
            raise ExportError(f"{path} is checkpoint {p.name}, but --tag {tag} was given")
        ckpt_dir, tag = p.parent, p.name
    elif _is_ckpt_dir(p):
        ckpt_dir = p
    else:
        raise ExportError(f"{path}: not a checkpoint (expected a run directory with checkpoints/, "
                          "a checkpoints/ directory or a checkpoint tag directory)")
    if tag is None:
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise ExportError(f"{ckpt_dir}: no complete checkpoint (no valid `latest` file); pass --tag to choose one")
    elif not (ckpt_dir / tag).is_dir():
        tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and _kind(d))
        raise ExportError(f"{ckpt_dir}: no checkpoint tag {tag!r} (available: {', '.join(tags) or 'none'})")
    kind = _kind(ckpt_dir / tag)
    if kind is None:
        raise ExportError(f"{ckpt_dir / tag}: not a DeepSpeed checkpoint (no model or optimizer states)")
    run_dir = ckpt_dir.parent
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: no config.yaml (the run config the trainer writes beside checkpoints/)")
    return CheckpointRef(run_dir, ckpt_dir, tag, kind)


# Modules a run trains for a training loss only (the feature aligner's projection and its
# frozen encoder): the model rebuilt from a checkpoint for export and sampling leaves them
# out, and their checkpoint tensors are dropped.
TRAINING_ONLY = ("aligner.",)


def load_run_config(ref: CheckpointRef):
    """The run's config, its model section without the training-only modules and with
    the plain RMSNorm (model.fused_rmsnorm is a training-time kernel: the weights are
    the same, and reading a checkpoint must not need apex)."""
    import dataclasses

    from megafusion.config import ConfigError, load_config

    try:
        cfg = load_config(ref.run_dir / "config.yaml")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise ExportError(f"{ref.run_dir / 'config.yaml'}: {str(exc).splitlines()[0]}") from None
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.model) if f.name.startswith("align_")}
    cfg.model = dataclasses.replace(cfg.model, **defaults, fused_rmsnorm="none")
    return cfg


def inference_tensors(names) -> list:
    return [n for n in names if not n.startswith(TRAINING_ONLY)]


# -------------------------------------------------------------------- consolidating

@contextlib.contextmanager
def _quiet():
    """DeepSpeed's conversion helpers print progress (stdout) and progress bars (stderr)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# What torch.load and DeepSpeed's readers raise on a truncated or corrupt file.
READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, EOFError, IndexError, pickle.UnpicklingError)


def unreadable_file(tag_dir: Path) -> Path | None:
    """The first of a checkpoint's files that torch.load cannot open (memory-mapped: only
    its header and index are read), for an error that names it; None if all open."""
    for path in sorted(tag_dir.glob("*.pt")):
        try:
            torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except (*READ_ERRORS, AttributeError, ImportError):
            return path
    return None


def read_error(ref: CheckpointRef, what: str, exc: BaseException) -> ExportError:
    """ExportError naming the unreadable file of ref (else its tag directory) and why."""
    where = unreadable_file(ref.tag_dir) or ref.tag_dir
    return ExportError(f"{where}: cannot {what} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})")


def consolidate_zero(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 trainable weights of a ZeRO checkpoint, keyed by LMFusionModel names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with _quiet():
            return get_fp32_state_dict_from_zero_checkpoint(str(ref.ckpt_dir), tag=ref.tag, exclude_frozen_parameters=True)
    except (*READ_ERRORS, NotImplementedError) as exc:
        raise read_error(ref, "consolidate the ZeRO checkpoint", exc) from None


def plain_masters(saved: dict, fused, cfg) -> dict[str, tuple[int, int | tuple[int, int]]] | None:
    """Where the fp32 master weights of a 16-bit stage-0 checkpoint are (`saved`, its
    mp_rank_00_model_states.pt loaded): `module` name -> its place for master_at. None
    where there are none: an fp32 run (the module is the master), or masters that do
    not line up with the model.

    DeepSpeed's FP16 optimizer wrappers (bf16 or fp16 without ZeRO) save one entry per
    parameter group, the group's parameters in order: FP16_UnfusedOptimizer a list of
    tensors (fp32_groups), FP16_Optimizer one flat tensor (fp32_groups_flat). The groups
    are megafusion.parallel.engine.parameter_groups of the trained model, rebuilt here
    on `fused` (the model built from the run config `cfg`, which lacks training-only
    parameters such as the aligner's: masters that match no parameter in order are
    skipped). Each must match the 16-bit weight the engine ran, which is that master
    rounded: in shape, and bitwise in its first elements (a page of each memory-mapped
    tensor; is_master_of checks all of it when it is read)."""
    from megafusion.parallel.engine import parameter_groups

    module, optim = saved.get("module") or {}, saved.get("optimizer")
    if not isinstance(optim, dict):
        return None
    flat = "fp32_groups" not in optim
    saved_groups = optim.get("fp32_groups_flat" if flat else "fp32_groups")
    meta = (optim.get("optimizer_state_dict") or {}).get("param_groups") or []
    if not isinstance(saved_groups, (list, tuple)) or not saved_groups:
        return None
    names_of: dict[int, list[str]] = {}
    for name, t in list(fused.state_dict(keep_vars=True).items()) + list(fused.named_parameters()):
        names_of.setdefault(id(t), []).append(name)
    groups = parameter_groups(fused, cfg)
    if len(groups) != len(saved_groups):
        return None
    out = {}
    for i, (group, masters) in enumerate(zip(groups, saved_groups)):
        if i < len(meta) and meta[i].get("name") not in (None, group["name"]):
            return None
        names = [next((n for n in names_of.get(id(p), ()) if n in module), None) for p in group["params"]]
        if None in names:
            return None
        if flat:  # the group's tensors end to end
            if not isinstance(masters, torch.Tensor) or masters.numel() != sum(module[n].numel() for n in names):
                return None
            places, offset = [], 0
            for n in names:
                places.append((i, (offset, module[n].numel())))
                offset += module[n].numel()
        else:
            places = [(i, j) for j in range(len(masters))]
        j = 0
        for place in places:
            if j < len(names) and is_master_of(master_at(saved, place, module[names[j]].shape), module[names[j]],
                                               sample=True):
                out[names[j]] = place
                j += 1
        if j != len(names):
            return None
    return out


def master_at(saved: dict, place, shape) -> torch.Tensor:
    """The master tensor at `place` (from plain_masters) of a loaded stage-0 checkpoint."""
    i, where = place
    optim = saved["optimizer"]
    if "fp32_groups" in optim:
        return optim["fp32_groups"][i][where]
    offset, numel = where
    return optim["fp32_groups_flat"][i].view(-1)[offset:offset + numel].view(shape)


def is_master_of(master, weight, sample: bool = False) -> bool:
    """`weight` (16 bits) is fp32 `master` rounded, as the engine copies it after a step."""
    if not isinstance(master, torch.Tensor) or master.dtype != torch.float32 or master.shape != weight.shape:
        return False
    if not weight.is_floating_point() or weight.dtype == torch.float32:
        return False  # an fp32 run: the module weights are the masters
    if sample:
        master, weight = master.reshape(-1)[:256], weight.reshape(-1)[:256]
    return torch.equal(master.to(weight.dtype), weight)


def plain_states(ref: CheckpointRef, fused=None, cfg=None) -> dict[str, torch.Tensor]:
    """The weights of a stage-0 checkpoint (DeepSpeed's own `module` entry) in fp32: its
    fp32 masters where a 16-bit run saved them (plain_masters, for `fused` built from
    run config `cfg`), else the module weights."""
    path = ref.tag_dir / PLAIN_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        module = saved["module"]
        places = plain_masters(saved, fused, cfg) if fused is not None else None
    except READ_ERRORS as exc:
        raise ExportError(f"{path}: cannot read the stage-0 checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    out = {}
    for k, v in module.items():
        if places and k in places:
            master = master_at(saved, places[k], v.shape)
            if not is_master_of(master, v):
                raise ExportError(f"{path}: the fp32 master of {k} is not its {v.dtype} weight rounded "
                                  "(a damaged checkpoint?)")
            v = master
        out[k] = v.float() if v.is_floating_point() else v
    return out


def pipeline_layer_files(ref: CheckpointRef) -> dict[int, Path]:
    """PipelineModule layer index -> its one file (tensor-parallel checkpoints, several
    files per layer, are refused)."""
    files: dict[int, list[Path]] = {}
    for p in ref.tag_dir.iterdir():
        m = re.match(r"^layer_(\d+)-.*model_states\.pt$", p.name)
        if m:
            files.setdefault(int(m.group(1)), []).append(p)
    for idx, paths in files.items():
        if len(paths) != 1:
            raise ExportError(f"{ref.tag_dir}: layer {idx} has {len(paths)} files; tensor-parallel checkpoints are not supported")
    return {idx: paths[0] for idx, paths in sorted(files.items())}


def pipeline_layer_states(ref: CheckpointRef) -> dict[int, dict[str, torch.Tensor]]:
    """PipelineModule layer index -> that layer's state dict, loaded as DeepSpeed's
    PipelineModule.load_state_dir loads it (one model-parallel rank)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    engine = TorchCheckpointEngine()
    out = {}
    for idx, path in pipeline_layer_files(ref).items():
        with _quiet():
            _, state, _ = SDLoaderFactory.get_sd_loader([str(path)], checkpoint_engine=engine, version=2.0).load(
                1, 0, module_key=None, is_pipe_parallel=True)
        out[idx] = state
    return out


class PipelineMasters:
    """The fp32 master weights of a pipeline checkpoint, a parameter at a time. Each
    optimizer file (replica r, stage s) holds that replica's partition of each of the
    stage's flat fp32 groups (single_partition_of_fp32_groups) and, per group, where each
    parameter's fragment lies in it (param_slice_mappings, by the PipelineModule's names:
    "<layer index>.<key>"); a parameter is its fragments in replica order, as DeepSpeed's
    ds_to_universal merges them. Files are memory-mapped: a parameter reads its slices."""

    def __init__(self, ref: CheckpointRef):
        self.where = ref.tag_dir
        files = sorted((int(m.group(2)), int(m.group(1)), path) for path in ref.tag_dir.iterdir()
                       if (m := OPTIM_FILE_RE.match(path.name)))
        self.places: dict[tuple[int, str], list[tuple[Path, int, int, int]]] = {}
        self._mapped: dict[Path, list] = {}
        for _, _, path in files:  # stage, then replica: each parameter's fragments in order
            try:
                optim = torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("optimizer_state_dict", {})
            except READ_ERRORS as exc:
                raise ExportError(f"{path}: cannot read the pipeline optimizer states ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
            if "param_slice_mappings" not in optim or "single_partition_of_fp32_groups" not in optim:
                self.places, self._mapped = {}, {}
                return
            self._mapped[path] = optim["single_partition_of_fp32_groups"]  # mapped: read a slice at a time
            for group, mapping in enumerate(optim["param_slice_mappings"]):
                for name, fragment in mapping.items():
                    idx, _, key = name.partition(".")
                    self.places.setdefault((int(idx), key), []).append((path, group, fragment.start, fragment.numel))

    def __contains__(self, place: tuple[int, str]) -> bool:
        return place in self.places

    def get(self, idx: int, key: str, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 master of layer idx's `key`, checked against its 16-bit `weight` (a
        weight of an fp32 run is its own master)."""
        if weight.dtype == torch.float32:
            return weight
        pieces = [self._mapped[path][group].view(-1)[start:start + numel]
                  for path, group, start, numel in self.places[(idx, key)]]
        master = torch.cat(pieces) if pieces else torch.empty(0)
        if master.numel() != weight.numel() or not is_master_of(master.view(weight.shape), weight):
            raise ExportError(f"{self.where}: the fp32 master of pipeline layer {idx}'s {key} is not its "
                              f"{weight.dtype} weight rounded (a damaged checkpoint?)")
        return master.view(weight.shape)


def pipeline_to_fusion_names(layers: dict[int, dict], num_decoder_layers: int, where) -> dict[str, torch.Tensor]:
    """Pipeline layer states -> LMFusionModel names. Layer 0 = EmbedStage, 1..N =
    DecoderStage (its `layer` is layers[i-1]), N+1 = HeadStage (megafusion/parallel/pipeline.py)."""
    N = num_decoder_layers
    if sorted(layers) != list(range(N + 2)):
        raise ExportError(f"{where}: pipeline checkpoint has layers {sorted(layers)}, the model needs 0..{N + 1} "
                          f"(embed, {N} decoder layers, head)")
    embed = {"image_token_embed": "image_token_embed", "embed_tokens.": "embed_tokens.",
             "embedder.": "image_tokenizer.embedder.", "vae.": "image_tokenizer.vae."}
    head = {"image_token_head": "image_token_head", "text_norm.": "text_norm.", "lm_head.": "lm_head.",
            "image_norm.": "image_norm.", "predictor.": "image_tokenizer.predictor."}
    out = {}

    def put(prefixes, idx, key, value):
        for src, dst in prefixes.items():
            if key == src or (src.endswith(".") and key.startswith(src)):
                out[dst + key[len(src):]] = value
                return
        raise ExportError(f"{where}: pipeline layer {idx} has an unknown tensor {key!r}")

    for key, value in layers[0].items():
        put(embed, 0, key, value)
    for i in range(1, N + 1):
        for key, value in layers[i].items():
            put({"layer.": f"layers.{i - 1}."}, i, key, value)
    for key, value in layers[N + 1].items():
        put(head, N + 1, key, value)
    return out


def frozen_names(fused) -> set[str]:
    """Names (shared ones under each of their names) of the model's frozen parameters."""
    return {n for n, t in fused.state_dict(keep_vars=True).items() if isinstance(t, torch.nn.Parameter)
            and not t.requires_grad} | {n for n, p in fused.named_parameters() if not p.requires_grad}


def match_checkpoint(fused, shapes: dict[str, torch.Size], where) -> dict[str, torch.nn.Parameter]:
    """Checkpoint tensor name -> the model parameter it loads into, strictly: every name is
    a parameter of the same shape, every trainable parameter is named."""
    params = dict(fused.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    everything = fused.state_dict(keep_vars=True)  # shared parameters under each of their names
    names = set(params) | {n for n, t in everything.items() if isinstance(t, torch.nn.Parameter)}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise ExportError(f"{where}: checkpoint tensors the model does not have: {', '.join(unknown[:4])}"
                          f"{' ...' if len(unknown) > 4 else ''} (run config and checkpoint disagree)")
    missing = sorted(trainable - set(shapes))
    if missing:
        raise ExportError(f"{where}: checkpoint lacks trainable parameters: {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}")
    targets = {}
    for name, shape in shapes.items():
        p = everything[name] if name in everything else params[name]
        if tuple(p.shape) != tuple(shape):
            raise ExportError(f"{where}: {name} has shape {tuple(shape)} in the checkpoint, "
                              f"{tuple(p.shape)} in the model")
        targets[name] = p
    return targets


def load_trainable(fused, state: dict[str, torch.Tensor], where) -> None:
    """Copy checkpoint tensors onto the model's trainable parameters, strictly."""
    targets = match_checkpoint(fused, {name: value.shape for name, value in state.items()}, where)
    assigned = {}
    with torch.no_grad():
        for name, value in state.items():
            p = targets[name]
            if id(p) in assigned and not torch.equal(assigned[id(p)], value.to(p.dtype)):
                # e.g. tied embeddings trained apart on two pipeline stages
                raise ExportError(f"{where}: {name} is tied to another tensor in the model but differs from it "
                                  "in the checkpoint")
            p.copy_(value.to(p.dtype))
            assigned[id(p)] = value.to(p.dtype)


def load_checkpoint_model(path: str | os.PathLike, tag: str | None = None):
    """(LMFusionModel in fp32 and eval mode, run config, CheckpointRef) for a checkpoint."""
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.loading import BaseModelError

    ref = find_checkpoint(path, tag)
    cfg = load_run_config(ref)
    try:
        fused = LMFusionModel.from_base(cfg.model.base, cfg.model, dtype=torch.float32)
    except BaseModelError as exc:
        raise ExportError(f"{ref.run_dir / 'config.yaml'} names a base model that cannot be loaded: {exc}") from None
    except ValueError as exc:  # e.g. the VAE the run used is gone
        raise ExportError(f"{ref.run_dir / 'config.yaml'}: {str(exc).splitlines()[0]}") from None
    if ref.kind == "zero":
        state = consolidate_zero(ref)
    elif ref.kind == "plain":
        frozen = frozen_names(fused)
        state = {k: v for k, v in plain_states(ref, fused, cfg).items() if k not in frozen}
    else:
        layers, masters = pipeline_layer_states(ref), PipelineMasters(ref)
        for idx, layer in layers.items():
            for key, weight in layer.items():
                if (idx, key) in masters:
                    layer[key] = masters.get(idx, key, weight)
        state = pipeline_to_fusion_names(layers, len(fused.layers), ref.tag_dir)
        # The head stage trains its own copy of the BOI/EOI logit rows.
        fused.untie_image_token_head()
    state = {k: state[k] for k in inference_tensors(state)}
    load_trainable(fused, state, ref.tag_dir)
    return fused.eval(), cfg, ref
