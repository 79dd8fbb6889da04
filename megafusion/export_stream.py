"""The export of a checkpoint that never holds the model: tools/convert_to_hf.py at 70B.

A 70B run's fused model is 140e9 parameters; consolidating it whole in fp32, next to the
base model, would take about a terabyte of host memory. Here each tensor is read when its
shard is written:

- The fused model is built on the meta device (names, shapes, which tensors are
  trainable, ties; no storage), wrapped as the Hugging Face model and saved without
  weights, which writes config.json and generation_config.json as for a real model. Its
  state dict, cut by huggingface_hub's split_torch_state_dict_into_shards as
  save_pretrained cuts it, is the plan: which tensor goes into which shard.
- Shards are written in that order, each from tensors made one at a time: a trainable one
  from the checkpoint, a frozen one (the text tower) from the base model's safetensors
  through BaseWeights (memory-mapped, by key), each cast to the export dtype as the
  whole-model exporter casts it (fp32 first). A shard is written when it is complete
  and dropped; the index comes last.
- Checkpoint files are memory-mapped (torch.load(mmap=True)): only the pages of the
  tensors asked for are read. They are mapped again for every shard and released after
  it, because pages once read stay resident (and counted) while a file is mapped.

Host memory is therefore about one shard (--max-shard-size) plus one layer in fp32 and a
constant (the tokenizer, library code), whatever the model's depth
(tests/tools/test_export_memory.py measures it). The content
is that of megafusion.export.export_fused on the whole model (tested key by key).
"""
from __future__ import annotations

import contextlib
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.utils.serialization

from megafusion.checkpoint_reader import (PLAIN_FILE, READ_ERRORS, CheckpointRef, ExportError, PipelineMasters, _quiet,
                                          frozen_names, inference_tensors, is_master_of, master_at, match_checkpoint,
                                          pipeline_layer_files, pipeline_to_fusion_names, plain_masters,
                                          unreadable_file)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ------------------------------------------------------------------- checkpoints
#
# Each reader knows its tensors' names (LMFusionModel's) and shapes without reading them,
# and open() maps the files for a while: get(name) -> that tensor.

class _RankSlices:
    """One parameter of a ZeRO-1/2 param group: elements [start, start + numel) of the
    ranks' flat partitions laid end to end, gathered on contiguous() (the interface of
    DeepSpeed's GatheredTensor, its stage-3 counterpart)."""

    def __init__(self, parts: list[torch.Tensor], start: int, shape: torch.Size):
        self.parts, self.start, self.shape = parts, start, shape

    def contiguous(self) -> torch.Tensor:
        end, pos, pieces = self.start + self.shape.numel(), 0, []
        for part in self.parts:
            lo, hi = max(self.start, pos), min(end, pos + part.numel())
            if lo < hi:
                pieces.append(part[lo - pos:hi - pos])
            pos += part.numel()
        return torch.cat(pieces).view(self.shape)


class ZeroReader:
    """The fp32 master weights of a ZeRO checkpoint (stage 1, 2 or 3), a parameter at a
    time, laid out by DeepSpeed's own deepspeed.utils.zero_to_fp32 (pinned in
    requirements.txt): parse_model_states (names, shapes, shared parameters, buffers),
    parse_optim_states (each rank's flat fp32 partitions, memory-mapped), and per stage
    the function that places every parameter in them."""

    rounded = False  # fp32 masters

    def __init__(self, ref: CheckpointRef):
        from deepspeed.utils import zero_to_fp32 as z

        self.where = ref.tag_dir
        with self._errors():
            # mmap: at stages 1/2 the model-states file holds every trainable weight in 16
            # bits; parse_model_states keeps only the shapes and the buffers.
            with _quiet(), torch.utils.serialization.config.patch({"load.mmap": True}):
                self.model_states = z.parse_model_states(z.get_model_state_files(str(self.where)))
            self.optim_files = z.get_optim_files(str(self.where))
            with self.open() as get:
                self.shapes = {name: torch.Size(get.lazy[name].shape) for name in get.lazy}

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except (*READ_ERRORS, NotImplementedError) as exc:
            where = unreadable_file(self.where) or self.where
            raise ExportError(f"{where}: cannot consolidate the ZeRO checkpoint ({_reason(exc)})") from None

    @contextlib.contextmanager
    def open(self):
        from deepspeed.utils import zero_to_fp32 as z

        with self._errors(), _quiet():
            stage, world_size, groups, paddings = z.parse_optim_states(self.optim_files, str(self.where))
            if stage == 3:
                # Lazy already: a GatheredTensor per parameter, its padded slices of every
                # rank's partition (zero3_partitioned_param_info).
                lazy = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, groups, self.model_states, True)
            else:
                lazy = self._zero2_layout(z, world_size, groups, paddings)
        get = _LazyGetter(lazy, self._errors)
        try:
            yield get
        finally:
            get.lazy = None  # with `groups`, the last references to the mapped files

    def _zero2_layout(self, z, world_size, groups, paddings) -> dict:
        """Stages 1/2: _get_fp32_state_dict_from_zero2_checkpoint concatenates each param
        group's partitions over the ranks (the whole model, in memory) and narrows that
        per parameter. Run on meta tensors of the partitions' shapes it does the same
        bookkeeping (alignment paddings, shared parameters, its consistency check)
        without data: every parameter comes back as a view whose storage_offset is its
        place in its group's concatenation, read from the real partitions on demand."""
        meta = [[torch.empty_like(part, device="meta") for part in rank] for rank in groups]
        layout = z._get_fp32_state_dict_from_zero2_checkpoint(world_size, meta, self.model_states, True, paddings)
        group_of = {id(layout[name]): i for i, shapes in enumerate(self.model_states[0].param_shapes)
                    for name in shapes if name in layout}
        return {name: _RankSlices([rank[group_of[id(t)]] for rank in groups], t.storage_offset(), t.shape)
                if t.is_meta else t  # buffers are real tensors
                for name, t in layout.items()}


class _LazyGetter:
    """get(name) over a dict of tensors or of DeepSpeed's lazy ones (made on contiguous())."""

    def __init__(self, lazy: dict, errors):
        self.lazy, self._errors = lazy, errors

    def __call__(self, name: str) -> torch.Tensor:
        with self._errors():
            value = self.lazy[name]
            return value if isinstance(value, torch.Tensor) else value.contiguous()


class PlainReader:
    """A stage-0 checkpoint, mp_rank_00_model_states.pt: DeepSpeed's `module` entry (the
    weights the engine ran), or for a 16-bit run the fp32 masters in its optimizer
    entry (megafusion.checkpoint_reader.plain_masters). Names of frozen parameters in
    it (a tied base's head) are left out: the frozen tower comes from the base.
    rounded: some weights are 16 bits with no fp32 master to read."""

    def __init__(self, ref: CheckpointRef, fused, cfg):
        self.path = ref.tag_dir / PLAIN_FILE
        frozen = frozen_names(fused)
        with self._errors():
            saved = self._load()
            module = saved["module"]
            self.shapes = {k: v.shape for k, v in module.items() if k not in frozen}
            self.masters = plain_masters(saved, fused, cfg) or {}
            self.rounded = any(module[k].dtype in (torch.bfloat16, torch.float16) and k not in self.masters
                               for k in inference_tensors(self.shapes))
        del saved, module

    def _load(self) -> dict:
        return torch.load(self.path, map_location="cpu", mmap=True, weights_only=False)

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except READ_ERRORS as exc:
            raise ExportError(f"{self.path}: cannot read the stage-0 checkpoint ({_reason(exc)})") from None

    @contextlib.contextmanager
    def open(self):
        with self._errors():
            saved = self._load()

        def get(name):
            with self._errors():
                weight = saved["module"][name]
                if name not in self.masters:
                    return weight
                master = master_at(saved, self.masters[name], weight.shape)
            if not is_master_of(master, weight):
                raise ExportError(f"{self.path}: the fp32 master of {name} is not its {weight.dtype} weight rounded "
                                  "(a damaged checkpoint?)")
            return master

        try:
            yield get
        finally:
            saved = None  # the last reference to the mapped file


class PipelineReader:
    """Pipeline + ZeRO-1: one layer_XX-model_states.pt per PipelineModule layer, a flat
    state dict each (what DeepSpeed's SDLoader returns for one model-parallel rank is
    torch.load of that file). Names as megafusion.checkpoint_reader.pipeline_to_fusion_names maps
    them; a file is mapped when a tensor of it is first asked for."""

    def __init__(self, ref: CheckpointRef, num_decoder_layers: int):
        self.files = pipeline_layer_files(ref)
        self.where = ref.tag_dir
        keys = {}
        for idx, path in self.files.items():
            with self._errors(path):
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
                keys[idx] = {k: (idx, k, v.shape, v.dtype) for k, v in state.items()}
        self.location = pipeline_to_fusion_names(keys, num_decoder_layers, ref.tag_dir)
        self.shapes = {name: loc[2] for name, loc in self.location.items()}
        # The layer files hold the weights the engine ran (16 bits in a bf16 run); their
        # fp32 masters are partitioned in the optimizer files (PipelineMasters).
        self.masters = PipelineMasters(ref)
        self.rounded = any(self.location[n][3] in (torch.bfloat16, torch.float16)
                           and self.location[n][:2] not in self.masters for n in inference_tensors(self.shapes))

    @contextlib.contextmanager
    def _errors(self, path):
        try:
            yield
        except READ_ERRORS as exc:
            raise ExportError(f"{path}: cannot read the pipeline checkpoint ({_reason(exc)})") from None

    @contextlib.contextmanager
    def open(self):
        mapped = {}

        def get(name):
            idx, key = self.location[name][:2]
            with self._errors(self.files[idx]):
                if idx not in mapped:
                    mapped[idx] = torch.load(self.files[idx], map_location="cpu", mmap=True, weights_only=False)
                weight = mapped[idx][key]
            return self.masters.get(idx, key, weight) if (idx, key) in self.masters else weight

        try:
            yield get
        finally:
            mapped.clear()


# ---------------------------------------------------------------------- the model

def fused_skeleton(cfg, weights, untie_head: bool, where):
    """(LMFusionModel, its base LlamaForCausalLM) on the meta device; the VAE, frozen and
    small, is real (the export writes it to vae/). untie_head: the pipeline's own BOI/EOI
    logit rows. where: the run config, named in errors."""
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.image_io import ImageTokenizer
    from megafusion.parallel.base_weights import skeleton_base_model

    understanding = None
    if weights.vlm_config is not None:  # a LLaVA base: its language model and its vision parts
        from transformers import AutoModelForImageTextToText

        from megafusion.model.vlm import split_vlm

        with torch.device("meta"):
            base, understanding = split_vlm(AutoModelForImageTextToText.from_config(weights.vlm_config))
    else:
        base = skeleton_base_model(weights.config)
    try:
        with torch.device("meta"):  # the patchers' shapes; their weights come from the checkpoint
            image_tokenizer = ImageTokenizer(cfg.model, weights.config.hidden_size, side_seed=0)
    except ValueError as exc:  # e.g. the VAE the run used is gone
        raise ExportError(f"{where}: {str(exc).splitlines()[0]}") from None
    fused = LMFusionModel(base, cfg.model, image_tokenizer=image_tokenizer, understanding=understanding)
    if untie_head:
        fused.untie_image_token_head()
    return fused, base


def saved_tensors(model) -> dict[str, torch.Tensor]:
    """What save_pretrained writes of `model` (LMFusionForCausalLM), in its order: the
    state dict without _keys_to_ignore_on_save (the VAE), one name per shared tensor
    (names matching _tied_weights_keys give way, as in transformers' save_pretrained)."""
    state = model.state_dict(keep_vars=True)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    names_of = defaultdict(list)
    for name, t in state.items():
        names_of[id(t)].append(name)
    for names in names_of.values():
        tied = [n for n in sorted(names) if any(re.search(p, n) for p in model._tied_weights_keys or ())]
        for name in tied[:len(names) - 1]:
            del state[name]
        if len(set(names) & set(state)) > 1:
            raise ExportError(f"tensors {sorted(names)} are shared in the model but not declared tied")
    return state


class TensorSources:
    """Every tensor of the fused model from where it lives: the checkpoint (trainable
    ones, strictly matched as load_trainable matches them) or the base model."""

    def __init__(self, fused, base, reader, base_weights, where):
        targets = match_checkpoint(fused, reader.shapes, where)
        self.checkpoint = defaultdict(list)  # id(tensor) -> its checkpoint names (several when tied)
        for name, t in targets.items():
            self.checkpoint[id(t)].append(name)
        self.base_key = {id(p): n for n, p in base.named_parameters()}
        if fused.understanding is not None:  # a LLaVA base's vision encoder and projector
            from megafusion.parallel.base_weights import UNDERSTANDING

            self.base_key.update({id(p): UNDERSTANDING + n for n, p in fused.understanding.vlm.named_parameters()})
        self.reader, self.weights, self.where = reader, base_weights, where

    def check(self, name: str, t: torch.Tensor) -> None:
        if id(t) not in self.checkpoint and id(t) not in self.base_key:
            raise ExportError(f"{self.where}: {name} is neither in the checkpoint nor in the base model")

    def value(self, t: torch.Tensor, get) -> torch.Tensor:
        """The tensor `t` stands for, in t's dtype, cast as the whole-model exporter casts
        (through fp32, the model's dtype there)."""
        names = self.checkpoint.get(id(t))
        if names:
            value = get(names[0]).to(torch.float32)
            for other in names[1:]:
                if not torch.equal(value, get(other).to(torch.float32)):  # e.g. tied embeddings trained apart
                    raise ExportError(f"{self.where}: {other} is tied to {names[0]} in the model but differs from it "
                                      "in the checkpoint")
        else:
            key = self.base_key[id(t)]
            value = self.weights.get(key).to(torch.float32)
            if value.shape != t.shape:
                raise ExportError(f"model.base={self.weights.base}: {key} has shape {tuple(value.shape)}, "
                                  f"the model expects {tuple(t.shape)}")
        return value.to(t.dtype).contiguous() if t.is_floating_point() else value.contiguous()


# ----------------------------------------------------------------------- writing

def write_weights(model, state: dict[str, torch.Tensor], sources: TensorSources, out: Path,
                  max_shard_size: int) -> None:
    """model.safetensors, or shards and model.safetensors.index.json, as save_pretrained
    names and indexes them (state: saved_tensors(model)); one shard in memory at a time."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm import tqdm

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    # Shown only when the export takes a while (a 70B one takes hours).
    with tqdm(total=split.metadata["total_size"], unit="B", unit_scale=True, desc="writing weights",
              delay=2) as bar:
        for shard_file, names in split.filename_to_tensors.items():
            with sources.reader.open() as get:
                shard = {}
                for name in names:
                    shard[name] = sources.value(state[name], get)
                    bar.update(shard[name].nbytes)
            save_file(shard, out / shard_file, metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def stream_export(ref: CheckpointRef, cfg, out_dir, *, dtype: torch.dtype, max_shard_size: int, overwrite: bool,
                  tokenizer, bos, eos, card: str, extra_files: dict, generation_defaults: dict) -> Path:
    """The checkpoint `ref` (of run config `cfg`) as a Hugging Face model directory,
    written beside out_dir and moved into its place once complete (megafusion.export.staged_dir)."""
    from megafusion.export import finish_model_dir, hf_model, staged_dir, tokenizer_with_image_tokens
    from megafusion.model.loading import BaseModelError
    from megafusion.parallel.base_weights import BaseWeights

    try:
        weights = BaseWeights(cfg.model.base)
    except (BaseModelError, ValueError) as exc:
        raise ExportError(f"{ref.run_dir / 'config.yaml'} names a base model that cannot be loaded: {exc}") from None
    fused, base = fused_skeleton(cfg, weights, untie_head=ref.kind == "pipeline", where=ref.run_dir / "config.yaml")
    if ref.kind == "zero":
        reader = ZeroReader(ref)
    elif ref.kind == "plain":
        reader = PlainReader(ref, fused, cfg)
    else:
        reader = PipelineReader(ref, len(fused.layers))
    reader.shapes = {k: reader.shapes[k] for k in inference_tensors(reader.shapes)}
    if dtype == torch.float32 and reader.rounded:
        print(f"warning: --dtype fp32 asked, but {ref.tag_dir} holds its trained weights in 16 bits only "
              f"({'pipeline layer files' if ref.kind == 'pipeline' else 'no fp32 masters that match them'}): "
              "the export holds them rounded", file=sys.stderr)
    sources = TensorSources(fused, base, reader, weights, ref.tag_dir)
    tokenizer = tokenizer_with_image_tokens(tokenizer, fused.vocab_size)
    model = hf_model(fused, bos=bos, eos=eos, dtype=dtype, generation_defaults=generation_defaults)
    state = saved_tensors(model)
    for name, t in state.items():
        sources.check(name, t)
    processor = None
    if fused.understanding is not None:  # a LLaVA base's processor travels with the export
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(weights.dir), use_fast=False)
    with staged_dir(out_dir, overwrite) as out:  # everything checked: written beside OUT_DIR
        model.save_pretrained(out, state_dict={}, safe_serialization=True)  # config, generation config, code, VAE
        write_weights(model, state, sources, out, max_shard_size)
        finish_model_dir(out, model, tokenizer, card=card, extra_files=extra_files, processor=processor)
    return Path(out_dir).expanduser()
