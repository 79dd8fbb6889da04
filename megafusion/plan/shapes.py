"""What the planner knows about a run's model: every parameter of the fused model with
its size, whether it trains, and which decoder layer it belongs to.

The fused model is built on the meta device from the run config, with the project's own
model code (megafusion/model), so the counts are the model's, not a formula's: 8B gives
8.03e9 frozen + 7.24e9 trainable parameters, 70B 70.55e9 + 68.75e9. The base and the VAE
need only their config.json; where the base directory is not on this machine (a laptop
planning a cluster run), the Llama-3 architectures below stand in, and a missing VAE is
taken as Stable Diffusion's (4 latent channels, 8x downsampling, 83.7e6 parameters).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

# config.json of Meta-Llama-3-8B / -70B (the 3.1 releases share these shapes).
LLAMA3 = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256),
    # X-Fusion's 1B base (configs/xfusion_1b.yaml); it ties its embedding and LM head.
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
# A base directory's name (lower case, without "meta", "-", "_" and ".") -> its preset:
# Meta-Llama-3-8B, Llama-3.1-8B-Instruct, Llama-3.3-70B, Llama-3.2-1B, ...
_PRESET_NAMES = {"llama3-8b": r"^llama3(1)?8b", "llama3-70b": r"^llama3(1|3)?70b", "llama3.2-1b": r"^llama321b"}
_LLAMA3_COMMON = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)

# stabilityai/sd-vae-ft-mse's config.json (the VAE family LMFusion and Transfusion use).
SD_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
          "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4}


class PlanError(ValueError):
    """A config, architecture or option the planner cannot use (one line)."""


@dataclass
class Param:
    name: str
    numel: int
    trainable: bool
    layer: int | None  # decoder layer index, None outside the decoder layers
    shape: tuple = ()
    group: str = ""  # a trainable parameter's optimizer group (engine.parameter_groups' name)


@dataclass
class ModelShape:
    """The fused model's parameters and the few architecture numbers the arithmetic needs."""

    params: list[Param]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tokens_per_image: int
    latent: tuple  # (C, h, w) the patcher sees
    unet_channels: tuple
    unet_layers_per_block: int
    llama_config: object = None
    notes: list = field(default_factory=list)
    tower_mode: str = "lmfusion"  # the decoder-layer design (megafusion/flops.py counts each)
    rope_streams: int = 1     # RoPE position streams per token (image_rope=2d: 3)
    target_copies: int = 1    # diffusion-target tensors per image a pipeline sends (2 where the velocity needs x_t)

    @property
    def frozen(self) -> int:
        return sum(p.numel for p in self.params if not p.trainable)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def layer_numel(self, i: int, trainable: bool | None = None) -> int:
        return sum(p.numel for p in self.params if p.layer == i and (trainable is None or p.trainable == trainable))

    @property
    def layer_both_towers(self) -> int:
        """Parameters of the largest decoder layer, text and image towers together: what
        ZeRO-3 gathers to run it."""
        return max(self.layer_numel(i) for i in range(self.layers))

    @property
    def largest_trainable_layer(self) -> int:
        return max(self.layer_numel(i, trainable=True) for i in range(self.layers))

    def stage_params(self, stage: int, stages: int) -> list[Param]:
        """The parameters pipeline stage `stage` of `stages` holds: its share of the decoder
        layers (as megafusion/parallel/pipeline.py splits them, uniformly), the first stage
        also the embedding and the image input side, the last the head and output side.
        A tied embedding is untied across stages: the last stage holds its own copy of
        the matrix as the LM head, and its own BOI/EOI logit rows (HeadStage)."""
        lo, hi = stage_layers(self.layers, stage, stages)
        out = []
        for p in self.params:
            if p.layer is not None:
                if lo <= p.layer < hi:
                    out.append(p)
            elif _is_input_side(p.name):
                if stage == 0:
                    out.append(p)
            elif stage == stages - 1:
                out.append(p)
        if stages > 1 and stage == stages - 1 and getattr(self.llama_config, "tie_word_embeddings", False):
            embed = next(p for p in self.params if p.name == "embed_tokens.weight")
            rows = next(p for p in self.params if p.name == "image_token_embed")
            out += [Param("lm_head.weight", embed.numel, embed.trainable, None, embed.shape),
                    Param("image_token_head", rows.numel, True, None, rows.shape)]
        return out


def stage_layers(layers: int, stage: int, stages: int) -> tuple[int, int]:
    base, extra = divmod(layers, stages)
    lo = stage * base + min(stage, extra)
    return lo, lo + base + (1 if stage < extra else 0)


def _is_input_side(name: str) -> bool:
    return name.startswith(("embed_tokens.", "image_token_embed", "image_tokenizer.embedder.", "image_tokenizer.vae.",
                            "understanding."))


_LAYER = re.compile(r"^layers\.(\d+)\.")


def base_configs_for(base: str, arch: str | None):
    """(the text tower's LlamaConfig, the whole LLaVA config or None, a note or None):
    from `arch` (a preset name, or a config.json / model directory of a Llama or a LLaVA)
    when given, else from model.base's config.json, else a Llama-3 preset named by the
    base path (".../Meta-Llama-3-70B" -> llama3-70b)."""
    from transformers import LlamaConfig

    if arch:
        if arch in LLAMA3:
            return LlamaConfig(**{**_LLAMA3_COMMON, **LLAMA3[arch]}), None, f"architecture: built-in {arch}"
        path = Path(arch).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise PlanError(f"--arch {arch}: not a preset ({', '.join(LLAMA3)}) nor a config.json or model directory")
        return (*_configs_from_json(path), f"architecture: {path}")
    local = Path(str(base)).expanduser()
    if (local / "config.json").is_file() or str(base) == "smollm2" or local.suffix == ".gguf":
        from megafusion.model.loading import load_base_configs

        try:
            return (*load_base_configs(str(base)), f"architecture: {base}")
        except ValueError as exc:
            raise PlanError(str(exc).splitlines()[0]) from None
    name = local.name.lower().replace("meta-", "").replace("-", "").replace("_", "").replace(".", "")
    for preset, pattern in _PRESET_NAMES.items():
        if re.match(pattern + r"($|[^0-9])", name):
            note = f"architecture: model.base={base} is not on this machine; using the built-in {preset} (--arch to choose)"
            return LlamaConfig(**{**_LLAMA3_COMMON, **LLAMA3[preset]}), None, note
    raise PlanError(f"model.base={base}: no config.json here and not a known Llama-3 name; pass --arch "
                    f"({', '.join(LLAMA3)} or a config.json)")


def _configs_from_json(path: Path):
    """(text LlamaConfig, LLaVA config or None) from a config.json alone (a LLaVA's
    weights and processor are not needed to plan it)."""
    from transformers import AutoConfig, LlamaConfig

    from megafusion.model.loading import LLAVA_MODEL_TYPES

    try:
        data = json.loads(path.read_text())
        kind = data.get("model_type", "llama")
        if kind in LLAVA_MODEL_TYPES:
            vlm = AutoConfig.for_model(kind, **{k: v for k, v in data.items() if k != "model_type"})
            return vlm.text_config, vlm
        return LlamaConfig(**data), None
    except (ValueError, TypeError, AttributeError) as exc:
        raise PlanError(f"--arch {path}: not a Llama or LLaVA config.json ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


@contextlib.contextmanager
def _vae_config_dir(model_cfg, notes: list):
    """A model config whose vae_path has a readable config.json (the SD VAE's when the
    run's VAE is not on this machine)."""
    from megafusion.model.image_io import _vae_location

    if model_cfg.image_mode != "vae":
        yield model_cfg
        return
    try:
        _vae_location(model_cfg.vae_path)
        yield model_cfg
        return
    except ValueError:
        pass
    with tempfile.TemporaryDirectory(prefix="megafusion-plan-vae-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(SD_VAE))
        notes.append(f"VAE: model.vae_path={model_cfg.vae_path} is not on this machine; using Stable Diffusion's "
                     "VAE shape (4 latent channels, 8x downsampling)")
        yield dataclasses.replace(model_cfg, vae_path=tmp)


def _vae_skeleton(path):
    """The VAE from its config.json alone: the planner needs its parameter count, not its
    weights (the meta device gives shapes without storage)."""
    from diffusers import AutoencoderKL

    from megafusion.model.image_io import _vae_location

    _, _, config = _vae_location(path)
    vae = AutoencoderKL.from_config(config)
    vae.requires_grad_(False)
    return vae


_BUILT: dict = {}


def model_shape(cfg, arch: str | None = None) -> ModelShape:
    """The run's fused model's parameters and dimensions (_build_model_shape), built once
    per model config: a run's start-up plans twice (preflight's qwZ check on every rank,
    then rank 0's fit check), and each build takes ~7 s at 70B. Callers read it only."""
    key = (repr(cfg.model), arch)
    if key not in _BUILT:
        _BUILT.clear()  # one model per process; a test's many configs do not pile up
        _BUILT[key] = _build_model_shape(cfg, arch)
    return _BUILT[key]


def _build_model_shape(cfg, arch: str | None) -> ModelShape:
    """Build the run's fused model on the meta device and list its parameters."""
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.image_io import ImageTokenizer
    from megafusion.parallel.base_weights import skeleton_base_model

    config, vlm_config, note = base_configs_for(cfg.model.base, arch)
    notes = [note] if note else []
    # fork_rng: building draws the image tokenizer's seed from the global RNG, and a run
    # that plans at start-up (fit_check.py) must draw its own seed and noise as without.
    with _vae_config_dir(cfg.model, notes) as model_cfg, torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            understanding = None
            if vlm_config is not None:  # a LLaVA base: its vision tower and projector, frozen
                from transformers import AutoModelForImageTextToText

                from megafusion.model.vlm import split_vlm

                base, understanding = split_vlm(AutoModelForImageTextToText.from_config(vlm_config))
            else:
                base = skeleton_base_model(config)
            tokenizer = ImageTokenizer(model_cfg, config.hidden_size, vae_loader=_vae_skeleton)
            fused = LMFusionModel(base, model_cfg, image_tokenizer=tokenizer, understanding=understanding)
        latent = tuple(tokenizer.latent_shape)
        tokens = tokenizer.tokens_per_image
        target_copies = 2 if fused.objective.velocity_needs_x_t else 1
    from megafusion.parallel.engine import parameter_groups

    # The optimizer parameter group of each trainable parameter, as the trainer builds
    # them (DeepSpeed flattens and partitions each group on its own under ZeRO-1/2).
    group_of = {id(q): g["name"] for g in parameter_groups(fused, cfg) for q in g["params"]}
    params = []
    for name, p in fused.named_parameters():
        m = _LAYER.match(name)
        params.append(Param(name, p.numel(), p.requires_grad, int(m.group(1)) if m else None, tuple(p.shape),
                            group_of.get(id(p), "")))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(params=params, hidden=config.hidden_size, layers=config.num_hidden_layers,
                      heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=head_dim,
                      intermediate=config.intermediate_size, vocab=config.vocab_size, tokens_per_image=tokens,
                      latent=latent, unet_channels=tuple(int(c) for c in cfg.model.unet_channels),
                      unet_layers_per_block=int(cfg.model.unet_layers_per_block), llama_config=config, notes=notes,
                      tower_mode=cfg.model.tower_mode, rope_streams=3 if cfg.model.image_rope == "2d" else 1,
                      target_copies=target_copies)
