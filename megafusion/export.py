"""From a fused model or a training checkpoint to a Hugging Face model directory
(tools/convert_to_hf.py is the command line). Checkpoints are read by
megafusion/checkpoint_reader.py, which megafusion/generate.py uses as well.

Two paths share its reading rules: load_checkpoint_model builds the whole fused
model in memory (generation needs it anyway; export_fused writes such a model), while
export_checkpoint streams a checkpoint into a model directory a shard at a time without
ever holding the model (megafusion/export_stream.py; a 70B export would otherwise need
about a terabyte of host memory). Both write the same directory.

The directory is written beside OUT_DIR and moved into its place only once complete
(staged_dir): a failure midway leaves OUT_DIR, or the export it held, as it was.

Every failure a user can cause is an ExportError with a one-line message.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from megafusion.checkpoint_reader import CheckpointRef, ExportError, find_checkpoint, load_run_config

MODEL_CODE_DIR = Path(__file__).resolve().parent / "model"
ENTRY_MODULE = "hf"  # megafusion/model/hf.py: the auto_map target
BOI_TOKEN, EOI_TOKEN = "<|begin_of_image|>", "<|end_of_image|>"


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
    for f in dataclasses.fields(fused.cfg):  # feature alignment is a training loss: its modules stay behind
        if f.name.startswith("align_"):
            fusion[f.name] = f.default
    if fused.cfg.image_mode == "vae":
        fusion["vae_path"] = VAE_SUBFOLDER
    base_config = {k: v for k, v in fused.llama_config.to_diff_dict().items()
                   if k not in ("_name_or_path", "transformers_version", "architectures")}
    vlm_config = None
    if fused.understanding is not None:  # a LLaVA base: the export rebuilds its vision parts from this
        vlm_config = {k: v for k, v in fused.understanding.vlm_config.to_diff_dict().items()
                      if k not in ("_name_or_path", "transformers_version", "architectures")}
        vlm_config["model_type"] = fused.understanding.vlm_config.model_type
    config = MegafusionConfig(base_config=base_config, fusion=fusion, vlm_config=vlm_config,
                              untied_image_token_head=bool(getattr(fused.llama_config, "tie_word_embeddings", False))
                              and not fused.tied_embeddings,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config.architectures = ["LMFusionForCausalLM"]
    vae = fused.image_tokenizer.vae
    fused.aligner = None  # `fused` is the export's own (callers hand over a copy)
    fused.cfg = dataclasses.replace(fused.cfg, **{k: v for k, v in fusion.items() if k.startswith("align_")})
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
                     extra_files: dict[str, str] | None = None, processor=None) -> Path:
    """Beside what save_pretrained wrote (weights, configs and, in VAE mode, the VAE in
    vae/: LMFusionForCausalLM.save_pretrained): the model code (auto_map), the tokenizer
    (inside a LLaVA base's processor, when given), extra files and the model card."""
    for f in model_code_files():  # the trainer's code, flat (save_pretrained copied part of it already)
        shutil.copy(f, out / f.name)
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["auto_map"] = {"AutoConfig": f"{ENTRY_MODULE}.MegafusionConfig",
                            "AutoModelForCausalLM": f"{ENTRY_MODULE}.LMFusionForCausalLM"}
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.tokenizer = tokenizer
        processor.save_pretrained(out)
    else:
        tokenizer.save_pretrained(out)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def export_fused(fused, tokenizer, out_dir: str | os.PathLike, *, bos: int | None, eos: int,
                 dtype: torch.dtype = torch.float32, max_shard_size: str | int = "5GB", overwrite: bool = False,
                 card: str | None = None, extra_files: dict[str, str] | None = None,
                 generation_defaults: dict | None = None) -> Path:
    """Write `fused` (an LMFusionModel in memory) as a Hugging Face model directory, with
    transformers' save_pretrained (export_checkpoint streams instead; the two agree)."""
    max_shard_size = shard_size_bytes(max_shard_size)
    tokenizer = tokenizer_with_image_tokens(tokenizer, fused.vocab_size)
    model = hf_model(fused, bos=bos, eos=eos, dtype=dtype, generation_defaults=generation_defaults)
    with staged_dir(out_dir, overwrite) as out:
        model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
        finish_model_dir(out, model, tokenizer, card=card, extra_files=extra_files)
    return Path(out_dir).expanduser()


def shard_size_bytes(size: str | int) -> int:
    """--max-shard-size in bytes, read by the parser huggingface_hub's
    split_torch_state_dict_into_shards applies to a string (both exporters cut shards
    with it): units KB, MB, GB, TB in any case, powers of 1000 (5GB = 5e9 bytes)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        n = size if isinstance(size, int) and not isinstance(size, bool) else parse_size_to_int(size)
    except (ValueError, TypeError, AttributeError, OverflowError):
        n = None
    if n is None or n <= 0:
        raise ExportError(f"--max-shard-size {size}: expected a positive size such as 5GB or 500MB "
                          "(units KB, MB, GB, TB)")
    return n


def check_out_dir(out_dir, overwrite: bool) -> Path:
    """OUT_DIR as given (~ expanded), refused in one line where it cannot be written: a
    file, under a file, non-empty without --overwrite."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    above = next(p for p in out.absolute().parents if p.exists() or p == p.parent)
    if not above.is_dir():
        raise ExportError(f"{out_dir}: {above} is not a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ExportError(f"{out_dir}: cannot write in {above} (permission denied)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_dir(out_dir, overwrite: bool):
    """A new, empty directory beside OUT_DIR (same parent, so that the final rename is
    atomic) to write the export into. On success it takes OUT_DIR's place, and a previous
    export there is removed only then; on any failure it is removed and OUT_DIR is left
    as it was. An OSError while writing (a full disk, no permission) is an ExportError."""
    out = check_out_dir(out_dir, overwrite).resolve()
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    kept = "left as it was" if out.exists() else "nothing written"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_sibling(out, "partial")
    except OSError as exc:
        raise ExportError(f"{out_dir}: cannot create a directory beside it ({exc.strerror or exc})") from None
    done = False
    try:
        try:
            yield tmp
        except OSError as exc:
            raise ExportError(f"{out_dir}: writing the export failed ({exc.strerror or exc}); {kept}") from None
        old = None
        try:
            if out.exists():
                old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
                os.rename(out, old)
            os.rename(tmp, out)
        except OSError as exc:
            if old is not None and old.exists() and not out.exists():
                os.rename(old, out)
            raise ExportError(f"{out_dir}: cannot move the finished export into place ({exc.strerror or exc}); "
                              f"{kept}") from None
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            for p in made:  # the parents this call created, innermost first, if still empty
                with contextlib.suppress(OSError):
                    p.rmdir()


def _new_sibling(out: Path, what: str) -> Path:
    while True:
        tmp = out.parent / f".{out.name}.{what}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # the umask's permissions, as OUT_DIR would have had
            return tmp
        except FileExistsError:
            continue


def refuse_overlap(out_dir, ref: CheckpointRef, cfg, base_resolved: str) -> None:
    """OUT_DIR may not be, contain or lie inside anything the export reads (an
    --overwrite would delete it, or the export would land in it): the checkpoints
    directory, the checkpoint, the base model, the VAE; nor be or contain the run
    directory (an export inside it, e.g. RUN_DIR/hf as tools/demo.py writes, is fine)."""
    out = Path(out_dir).expanduser().resolve()
    inputs = [("run directory", ref.run_dir, False), ("checkpoints directory", ref.ckpt_dir, True),
              ("checkpoint", ref.tag_dir, True), ("base model", Path(base_resolved), True)]
    base = Path(cfg.model.base).expanduser()
    if base.exists():
        inputs.append(("base model", base, True))
    if cfg.model.image_mode == "vae" and cfg.model.vae_path and Path(cfg.model.vae_path).expanduser().exists():
        inputs.append(("VAE", Path(cfg.model.vae_path).expanduser(), True))
    for relation, test in (("is", lambda p, _: out == p), ("contains", lambda p, _: out in p.parents),
                           ("lies inside", lambda p, no_inside: no_inside and p in out.parents)):
        for what, path, no_inside in inputs:
            if test(path.resolve(), no_inside):
                raise ExportError(f"{out_dir}: OUT_DIR {relation} the {what} {path.resolve()}; "
                                  "choose a directory apart from it")


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
                      dtype: str | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False) -> Path:
    """tools/convert_to_hf.py: checkpoint -> Hugging Face directory, streamed (see
    megafusion/export_stream.py: host memory of a shard and a layer, not of the model).
    dtype "bf16"/"fp32" (default: the run's train.dtype)."""
    from megafusion.export_stream import stream_export
    from megafusion.model.loading import BaseModelError, load_tokenizer, resolve_base

    shard_bytes = shard_size_bytes(max_shard_size)
    ref = find_checkpoint(checkpoint, tag)
    check_out_dir(out_dir, overwrite)  # refused before the slow part
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
    refuse_overlap(out_dir, ref, cfg, base_resolved)
    bos, eos = special_ids(tokenizer, cfg.data)
    card = model_card(cfg, ref, torch_dtype, base_resolved)
    run_config = (ref.run_dir / "config.yaml").read_text()
    return stream_export(ref, cfg, out_dir, dtype=torch_dtype, max_shard_size=shard_bytes, overwrite=overwrite,
                         tokenizer=tokenizer, bos=bos, eos=eos, card=card, extra_files={"run_config.yaml": run_config},
                         generation_defaults={"image_num_inference_steps": cfg.log.sample_diffusion_steps,
                                              "image_guidance_scale": cfg.log.sample_guidance})
