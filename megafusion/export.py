"""From a training checkpoint to the fused model, and to a Hugging Face model directory
(tools/convert_to_hf.py is the command line; megafusion/generate.py loads checkpoints
through load_checkpoint_model as well).

Two paths share the reading rules below: load_checkpoint_model builds the whole fused
model in memory (generation needs it anyway; export_fused writes such a model), while
export_checkpoint streams a checkpoint into a model directory a shard at a time without
ever holding the model (megafusion/export_stream.py; a 70B export would otherwise need
about a terabyte of host memory). Both write the same directory.

What the trainer writes (megafusion/parallel/checkpoint.py) and how it is read back:
- ZeRO (stage 3, or 1/2 without pipeline stages): DeepSpeed's partitioned optimizer
  files, consolidated by deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
  (fp32 master weights, keys are LMFusionModel's parameter names).
- Stage 0 (DeepSpeed's plain data parallelism, the CPU demo's setting): one
  mp_rank_00_model_states.pt whose `module` holds the weights the engine ran (fp32 on
  the CPU); with tied embeddings it also names the frozen head, which is dropped here
  (it comes from the base).
- Pipeline + ZeRO-1: one layer_XX-model_states.pt per PipelineModule layer, read with
  the loader DeepSpeed's PipelineModule.load_state_dir uses (SDLoaderFactory); layer 0
  is the embed stage, 1..N the decoder layers, N+1 the head stage, whose own copy of the
  BOI/EOI logit rows (image_token_head) the exported model keeps. These files hold the
  module's own weights (what the pipeline engine ran: bf16 in a bf16 run, whose fp32
  masters stay in the optimizer files).
Checkpoints hold trainable parameters only (exclude_frozen_parameters): the frozen text
tower comes from the base model the run config names, as at every training start. Every
trainable parameter of the model must come from the checkpoint and every checkpoint
tensor must land on one (names and shapes checked), so a checkpoint of another model
configuration is refused rather than half-loaded.

Every failure a user can cause is an ExportError with a one-line message.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_CODE_DIR = Path(__file__).resolve().parent / "model"
ENTRY_MODULE = "hf"  # megafusion/model/hf.py: the auto_map target
BOI_TOKEN, EOI_TOKEN = "<|begin_of_image|>", "<|end_of_image|>"
LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
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


def load_run_config(ref: CheckpointRef):
    from megafusion.config import ConfigError, load_config

    try:
        return load_config(ref.run_dir / "config.yaml")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise ExportError(f"{ref.run_dir / 'config.yaml'}: {str(exc).splitlines()[0]}") from None


# -------------------------------------------------------------------- consolidating

@contextlib.contextmanager
def _quiet():
    """DeepSpeed's conversion helpers print progress (stdout) and progress bars (stderr)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def consolidate_zero(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """fp32 trainable weights of a ZeRO checkpoint, keyed by LMFusionModel names."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with _quiet():
            return get_fp32_state_dict_from_zero_checkpoint(str(ref.ckpt_dir), tag=ref.tag, exclude_frozen_parameters=True)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ExportError(f"{ref.tag_dir}: cannot consolidate the ZeRO checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def plain_states(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The module weights of a stage-0 checkpoint (DeepSpeed's own `module` entry)."""
    try:
        saved = torch.load(ref.tag_dir / PLAIN_FILE, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise ExportError(f"{ref.tag_dir / PLAIN_FILE}: cannot read the stage-0 checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


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
        state = {k: v for k, v in plain_states(ref).items() if k not in frozen}
    else:
        state = pipeline_to_fusion_names(pipeline_layer_states(ref), len(fused.layers), ref.tag_dir)
        # The head stage trains its own copy of the BOI/EOI logit rows.
        fused.untie_image_token_head()
    load_trainable(fused, state, ref.tag_dir)
    return fused.eval(), cfg, ref


# -------------------------------------------------------------------------- writing

def tokenizer_with_image_tokens(tokenizer, vocab_size: int):
    """The base tokenizer with BOI and EOI as special tokens at ids V and V + 1 (reserved
    placeholders fill any gap between the tokenizer and the embedding matrix)."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    if vocab.get(BOI_TOKEN) == vocab_size and vocab.get(EOI_TOKEN) == vocab_size + 1:
        return tokenizer  # already one of ours
    tokenizer = copy.deepcopy(tokenizer)
    n = len(tokenizer)
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens, more than the model's vocabulary of {vocab_size}")
    fill = [AddedToken(f"<|megafusion_reserved_{i}|>", special=True) for i in range(vocab_size - n)]
    tokenizer.add_tokens(fill + [AddedToken(BOI_TOKEN, special=True), AddedToken(EOI_TOKEN, special=True)],
                         special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([BOI_TOKEN, EOI_TOKEN])
    if ids != [vocab_size, vocab_size + 1]:
        raise ExportError(f"BOI/EOI got token ids {ids}, expected {[vocab_size, vocab_size + 1]}")
    return tokenizer


def special_ids(tokenizer, data_cfg=None) -> tuple[int | None, int]:
    """(BOS, EOS) as the data pipeline uses them (run config overrides first)."""
    from megafusion.data.sequence import text_special_ids

    bos, eos = text_special_ids(tokenizer)
    if data_cfg is not None and getattr(data_cfg, "bos_token_id", None) is not None:
        bos = data_cfg.bos_token_id
    if data_cfg is not None and getattr(data_cfg, "eos_token_id", None) is not None:
        eos = data_cfg.eos_token_id
    return bos, eos


def model_code_files() -> list[Path]:
    """megafusion/model/*.py (not __init__.py), checked to be what transformers copies:
    it follows the entry module's own `from .x import` lines only (for a local
    directory), so those must name every module any of them imports."""
    from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

    files = sorted(p for p in MODEL_CODE_DIR.glob("*.py") if p.name != "__init__.py")
    entry = MODEL_CODE_DIR / f"{ENTRY_MODULE}.py"
    direct = set(get_relative_imports(entry))
    closure = {Path(f).stem for f in get_relative_import_files(entry)}
    if not closure <= direct:
        raise ExportError(f"{entry} must import {sorted(closure - direct)} directly (transformers copies only its direct relative imports)")
    return files


def hf_model(fused, *, bos: int | None, eos: int, dtype: torch.dtype = torch.float32,
             generation_defaults: dict | None = None):
    """`fused` (an LMFusionModel, real or on the meta device) cast to dtype (the VAE stays
    fp32) and wrapped as LMFusionForCausalLM with its config and generation config."""
    from transformers import GenerationConfig

    from megafusion.model.hf import VAE_SUBFOLDER, LMFusionForCausalLM, MegafusionConfig

    V = fused.vocab_size
    fusion = dataclasses.asdict(fused.cfg)
    fusion["base"] = str(fused.cfg.base)
    fusion["attention_backend"] = "auto"  # training may have used flash; inference picks what the device has
    fusion["activation_checkpointing"] = False
    fusion["fused_rmsnorm"] = "none"  # a training-time kernel choice; the export loads without apex
    if fused.cfg.image_mode == "vae":
        fusion["vae_path"] = VAE_SUBFOLDER
    base_config = {k: v for k, v in fused.llama_config.to_diff_dict().items()
                   if k not in ("_name_or_path", "transformers_version", "architectures")}
    config = MegafusionConfig(base_config=base_config, fusion=fusion,
                              untied_image_token_head=bool(getattr(fused.llama_config, "tie_word_embeddings", False))
                              and not fused.tied_embeddings,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config.architectures = ["LMFusionForCausalLM"]
    vae = fused.image_tokenizer.vae
    fused = fused.to(dtype)
    if vae is not None:
        vae.to(torch.float32)
    model = LMFusionForCausalLM(config, fused=fused).eval()
    gen = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, max_new_tokens=64, do_sample=False,
               # transformers' generate() writes text only: it cannot draw an image after BOI.
               suppress_tokens=[V, V + 1], boi_token_id=V, eoi_token_id=V + 1,
               # Not "guidance_scale": generate() would read it as its own text CFG.
               image_num_inference_steps=50, image_guidance_scale=3.0)
    gen.update(generation_defaults or {})
    model.generation_config = GenerationConfig(**gen)
    return model


def finish_model_dir(out: Path, model, tokenizer, *, card: str | None = None,
                     extra_files: dict[str, str] | None = None) -> Path:
    """Beside what save_pretrained wrote: the model code (auto_map), the tokenizer, the VAE,
    extra files and the model card."""
    from megafusion.model.hf import VAE_SUBFOLDER

    for f in model_code_files():  # the trainer's code, flat (save_pretrained copied part of it already)
        shutil.copy(f, out / f.name)
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["auto_map"] = {"AutoConfig": f"{ENTRY_MODULE}.MegafusionConfig",
                            "AutoModelForCausalLM": f"{ENTRY_MODULE}.LMFusionForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out)
    vae = model.model.image_tokenizer.vae
    if vae is not None:  # frozen, kept in its own precision (fp32)
        copy.deepcopy(vae).to(torch.float32).save_pretrained(out / VAE_SUBFOLDER, safe_serialization=True)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def export_fused(fused, tokenizer, out_dir: str | os.PathLike, *, bos: int | None, eos: int,
                 dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB", overwrite: bool = False,
                 card: str | None = None, extra_files: dict[str, str] | None = None,
                 generation_defaults: dict | None = None) -> Path:
    """Write `fused` (an LMFusionModel in memory) as a Hugging Face model directory, with
    transformers' save_pretrained (export_checkpoint streams instead; the two agree)."""
    out = prepare_out_dir(out_dir, overwrite)
    tokenizer = tokenizer_with_image_tokens(tokenizer, fused.vocab_size)
    model = hf_model(fused, bos=bos, eos=eos, dtype=dtype, generation_defaults=generation_defaults)
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    return finish_model_dir(out, model, tokenizer, card=card, extra_files=extra_files)


def prepare_out_dir(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _metrics(run_dir: Path, step: int | None) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    at = [r for r in rows if r.get("step") == step] if step is not None else []
    if at:
        return at[-1]
    return rows[-1] if rows else None


def model_card(cfg, ref: CheckpointRef, dtype: torch.dtype, base_resolved: str) -> str:
    m = _metrics(ref.run_dir, ref.step)
    fmt = lambda k: "n/a" if not m or m.get(k) is None else f"{m[k]:.4f}"  # noqa: E731
    mc = cfg.model
    return f"""---
library_name: transformers
tags: [megafusion, lmfusion, text-to-image, image-to-text]
---
# {cfg.run.name}: LMFusion model (megafusion)

A text-only Llama turned into a text+image model by the LMFusion recipe: the base
model's weights are the frozen text tower, every decoder layer has a trained image tower,
one shared attention with the hybrid mask (causal, bidirectional inside an image).

- Base model: `{mc.base}` ({base_resolved}); text-only input gives exactly its logits.
- Training run: `{ref.run_dir}` (`{cfg.run.name}`), checkpoint `{ref.tag}`, step {ref.step if ref.step is not None else "n/a"}
  ({ {"pipeline": "pipeline + ZeRO-1", "plain": "DeepSpeed stage 0"}.get(ref.kind, "ZeRO")}); its resolved config is `run_config.yaml`.
- Losses at that step (metrics.jsonl): total {fmt("loss")}, LM {fmt("lm_loss")}, diffusion {fmt("diffusion_loss")}.
- Images: {mc.image_mode} space, {mc.image_size}x{mc.image_size} pixels, {mc.patcher} patcher with {mc.patch_size}x{mc.patch_size} patches,
  objective {mc.objective} ({mc.num_train_timesteps} steps).
- Weights: {str(dtype).replace("torch.", "")}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)   # needs torch, transformers, diffusers
tok = AutoTokenizer.from_pretrained(DIR)
model.generate(**tok("The capital of France is", return_tensors="pt"))         # text (the base model's output)
pixels = model.generate_images([tok("a red circle", add_special_tokens=False).input_ids])  # [-1, 1]
```

With megafusion: `python tools/generate.py --model DIR image --prompt "a red circle" --out x.png`
(also `caption`, `text`, `interleave`).
"""


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, tag: str | None = None,
                      dtype: str | None = None, max_shard_size: str = "5GB", overwrite: bool = False) -> Path:
    """tools/convert_to_hf.py: checkpoint -> Hugging Face directory, streamed (see
    megafusion/export_stream.py: host memory of a shard and a layer, not of the model).
    dtype "bf16"/"fp32" (default: the run's train.dtype)."""
    from megafusion.export_stream import stream_export
    from megafusion.model.loading import BaseModelError, load_tokenizer, resolve_base

    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ExportError(f"--max-shard-size {max_shard_size}: expected a size such as 5GB or 500MB") from None
    ref = find_checkpoint(checkpoint, tag)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:  # refuse before the slow part
        raise ExportError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    run_dir = ref.run_dir.resolve()
    if out.resolve() == run_dir or out.resolve() in run_dir.parents:
        raise ExportError(f"{out_dir}: would replace the run directory {ref.run_dir}")
    cfg = load_run_config(ref)
    name = dtype or cfg.train.dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(name)
    if torch_dtype is None:
        raise ExportError(f"--dtype {name}: expected bf16 or fp32")
    try:
        tokenizer = load_tokenizer(cfg.model.base)
        base_resolved = str(resolve_base(cfg.model.base))
    except (BaseModelError, OSError, ValueError) as exc:
        raise ExportError(f"{ref.run_dir / 'config.yaml'} names a base model that cannot be loaded: "
                          f"{str(exc).splitlines()[0]}") from None
    bos, eos = special_ids(tokenizer, cfg.data)
    card = model_card(cfg, ref, torch_dtype, base_resolved)
    run_config = (ref.run_dir / "config.yaml").read_text()
    return stream_export(ref, cfg, out, dtype=torch_dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                         tokenizer=tokenizer, bos=bos, eos=eos, card=card, extra_files={"run_config.yaml": run_config},
                         generation_defaults={"image_num_inference_steps": cfg.log.sample_diffusion_steps})
