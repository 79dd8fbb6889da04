"""Images in and out of the transformer.

pixels [N,3,H,W] in [-1,1] --encode_images--> latents [N,C,h,w]        (frozen VAE or identity)
noisy latents, t --embed--> tokens [N, tokens_per_image, hidden], aux  (trainable)
hidden [N, tokens_per_image, hidden], aux --predict--> [N,C,h,w]       (trainable; epsilon or velocity)
latents --decode_latents--> pixels in [-1,1]

Patches are p x p (cfg.patch_size) in raster order, row-major, top-to-bottom and
left-to-right (Transfusion's order): token k is patch row k // (w/p), column k % (w/p).
Each patch vector is laid out (channel, row in patch, column in patch).

Two patchers (same token grid (h/p, w/p), so the token count never depends on the choice):
  linear  Linear(C*p*p -> hidden) plus a timestep embedding added to every token; out:
          Linear(hidden -> C*p*p), unpatchify. X-Fusion's choice.
  unet    LMFusion's: conv_in, one diffusers DownBlock2D per entry of cfg.unet_channels
          (timestep-conditioned ResNet blocks, *no* spatial downsampling: the p x p
          patching that follows is the only reduction, so the U-Net sees the full latent
          resolution and the grid matches the linear patcher), GroupNorm+SiLU, then the
          p x p patch projection to hidden. Out: patch projection hidden -> channels,
          mirrored UpDecoderBlock2D blocks (timestep-conditioned, no upsampling),
          GroupNorm+SiLU, conv_out to C.
          No skip connections from the down path to the up path. Transfusion and LMFusion
          do not say; without skips (a) everything the output knows about the noisy
          image went through the transformer, so the model cannot learn to denoise
          around the LLM with a small U-Net, and (b) aux is just the timesteps, so the
          output side can live on another pipeline stage and only hidden states (plus t)
          cross stage boundaries instead of full-resolution feature maps.

model.image_position=learned adds a learned table [tokens_per_image, hidden] to the
embedder's tokens (ViT's absolute position embedding; embedder.position, std 0.02 at
first); image_position=sincos is the same table started from DiT's 2D sine-cosine one,
centred over the grid. Without it an
image token knows where it sits only through RoPE's relative offsets to the tokens it
attends to, which the copied text weights do not read as a place in a 2D grid.
model.image_rope (image_rope.py) chooses the RoPE positions of an image's tokens.

model.patcher_layers=N adds N image-only transformer blocks (ImageBlocks, trained from
scratch, bidirectional over one image's tokens) on each side (model.patcher_sides=both)
or on the output side only (output): after the embedder's patch embedding, timestep and
position table, and before the predictor's projection, where the transformer's hidden
states get the predictor's own timestep embedding and position table first (and, with
model.prompt_context, the prompt's vector). They live inside `embedder` and `predictor`, so the sides stay
disjoint and a pipeline stage still owns whole sides.

aux returned by embed is the timesteps t [N]; predict needs nothing else. The parameters
of the two sides are disjoint (`embedder`, `predictor`; each has its own timestep
embedding), so pipeline stages can own them without weight tying.

The last layer of the output side is initialised to zero, so the first prediction is
exactly 0: the loss starts at its trivial value (E[eps^2] = 1 for epsilon prediction)
instead of a random prediction's much larger error, and the randomly initialised image
path sends no noise-dominated gradients into the image tower (which starts as a copy of
the pretrained text weights) on the first step (DiT/ControlNet's zero-init).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from diffusers import AutoencoderKL
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpDecoderBlock2D

from .config import FusionConfig


# --- patching -------------------------------------------------------------------------

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, (h/p)*(w/p), C*p*p], raster order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of patchify: [N, (h/p)*(w/p), C*p*p] -> [N, C, h, w]."""
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


# --- VAE --------------------------------------------------------------------------------

def _vae_location(path: str | None) -> tuple[str, str | None, dict]:
    """(directory, subfolder, config) of an AutoencoderKL; a diffusers pipeline directory
    (with the VAE in vae/) is accepted too. ValueError naming the path otherwise."""
    if not path:
        raise ValueError("model.vae_path is not set (image_mode=vae needs an AutoencoderKL directory)")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.vae_path={path}: no such directory")
    subfolder = None
    config_file = root / "config.json"
    if not config_file.is_file() and (root / "vae" / "config.json").is_file():
        subfolder, config_file = "vae", root / "vae" / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"model.vae_path={path}: not an AutoencoderKL directory (no config.json with _class_name AutoencoderKL)")
    return str(root), subfolder, config


def load_vae(path: str | None) -> AutoencoderKL:
    """A frozen AutoencoderKL in eval mode, through the ordinary from_pretrained path."""
    directory, subfolder, _ = _vae_location(path)
    try:
        vae = AutoencoderKL.from_pretrained(directory, subfolder=subfolder)
    except Exception as e:  # one line naming the path, whatever diffusers raised
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"model.vae_path={path}: cannot load AutoencoderKL ({type(e).__name__}: {msg})") from e
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def vae_encode(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [N,3,H,W] in [-1,1] -> normalised latents [N,C,h,w] (the VAE's device and
    dtype). The one encoder of the project: ImageTokenizer.encode_images and the latents
    tools/prepare_data.py --vae stores both call it, so pre-encoded shards and on-the-fly
    encoding give the same numbers.

    The posterior mean, not a sample: deterministic, so a shard is reproducible and
    matches what the model computes from the same pixels. Then diffusers' normalisation
    (z - shift_factor) * scaling_factor; shift_factor only where the VAE's config has one
    (SD3 and FLUX VAEs do; SD1/SDXL's do not)."""
    z = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (z - _shift_factor(vae)) * vae.config.scaling_factor


@torch.no_grad()
def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of vae_encode's normalisation, then the decoder: -> pixels, nominally in [-1,1]."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + _shift_factor(vae)
    return vae.decode(z).sample


def _shift_factor(vae: AutoencoderKL) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


def image_latent_shape(cfg: FusionConfig) -> tuple[int, int, int]:
    """(C, h, w) of what the transformer's image path sees, from the config alone (reads
    the VAE's config.json, not its weights): for the data pipeline and the packer."""
    if cfg.image_mode == "pixel":
        c, down = 3, 1
    elif cfg.image_mode == "vae":
        _, _, vcfg = _vae_location(cfg.vae_path)
        c = int(vcfg.get("latent_channels", 4))
        down = 2 ** (len(vcfg.get("block_out_channels", (64,))) - 1)
    else:
        raise ValueError(f"model.image_mode={cfg.image_mode!r}: expected one of vae, pixel")
    if cfg.image_size % down:
        raise ValueError(f"model.image_size={cfg.image_size} is not divisible by the VAE's downsampling factor {down}")
    h = cfg.image_size // down
    if h % cfg.patch_size:
        raise ValueError(f"model.patch_size={cfg.patch_size} does not divide the latent size {h}")
    return (c, h, h)


def tokens_per_image(cfg: FusionConfig) -> int:
    _, h, w = image_latent_shape(cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size)


# --- patchers ---------------------------------------------------------------------------

def _time_embedding(freq_dim: int, out_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({"proj": Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0),
                          "mlp": TimestepEmbedding(freq_dim, out_dim)})


def _embed_time(te: nn.ModuleDict, t: torch.Tensor) -> torch.Tensor:
    mlp = te["mlp"]
    return mlp(te["proj"](t).to(weight_dtype(mlp)))


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's parameters, for casting its input from its parent's
    forward. Not `module.weight.dtype`: under ZeRO-3 reading a child's parameter
    attribute gathers it and keeps it gathered until the parent's backward ends
    (DeepSpeed's ZeROOrderedDict registers it as the parent's external parameter);
    iterating parameters() reads no attribute."""
    return next(module.parameters()).dtype


def _groups(channels) -> int:
    """Largest GroupNorm group count <= 32 that divides every channel width."""
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(d for d in (32, 16, 8, 4, 2, 1) if g % d == 0)


def _finish_tokens(embedder: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens + the embedder's learned position table, where it has one, then its
    image-only blocks, where it has them. Inside the embedder's own forward, so that
    ZeRO-3 has gathered the table and the blocks with the embedder."""
    position = getattr(embedder, "position", None)
    tokens = tokens if position is None else tokens + position.to(tokens.dtype)
    blocks = getattr(embedder, "blocks", None)
    return tokens if blocks is None else blocks(tokens)


def _refine_hidden(predictor: nn.Module, hidden: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor | None = None) -> torch.Tensor:
    """The output side's image-only blocks, where it has them: the transformer's hidden
    states at an image's tokens plus the position table, then the blocks (which add
    their timestep embedding, and the prompt's vector under model.prompt_context,
    first; model.patcher_layers)."""
    blocks = getattr(predictor, "blocks", None)
    if blocks is None:
        return hidden
    position = getattr(predictor, "position", None)
    return blocks(hidden if position is None else hidden + position.to(hidden.dtype), t, context)


class ImageBlocks(nn.Module):
    """model.patcher_layers transformer blocks over the tokens of one image [N, T, hidden]:
    diffusers' BasicTransformerBlock (pre-norm self-attention and a GELU MLP of 4x hidden,
    no dropout: DiT's block without its adaLN), every token attending to every token of
    its image and to nothing else. Trained from scratch, so unlike the image tower (a
    copy of the text weights, whose attention keeps to recent tokens and the first one)
    they can mix an image's tokens from the first step.

    With `timestep` (the output side, whose input has no timestep in it yet) a timestep
    embedding is added to every token first.

    Each block's residual branches end in zero-initialised projections (DiT's
    adaLN-Zero idea), so the blocks start as the identity and the model starts as it
    would without them. They train at their own peak lr, train.patcher_layers_lr (the
    engine finds them by this class): at the demo's lr of 1e-3 they stalled its
    diffusion loss at 1.2 (0.5 without them), at DiT's 1e-4 the loss follows the run
    without them (configs/demo.yaml).
    Every weight sits in the nn.Linear or nn.LayerNorm that uses it, as ZeRO-3's
    gathering hooks need (torch's TransformerEncoderLayer reads its attention's weights
    from its own forward on its inference fast path)."""

    HEAD_SIZE = 64

    def __init__(self, hidden: int, layers: int, timestep: bool = False, context: bool = False):
        super().__init__()
        if hidden % self.HEAD_SIZE:
            raise ValueError(f"model.patcher_layers needs a hidden size divisible by {self.HEAD_SIZE}, not {hidden}")
        self.layers = nn.ModuleList(
            BasicTransformerBlock(hidden, hidden // self.HEAD_SIZE, self.HEAD_SIZE, activation_fn="gelu",
                                  norm_type="layer_norm")
            for _ in range(layers))
        for block in self.layers:
            for out in (block.attn1.to_out[0], block.ff.net[-1]):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
        self.time = _time_embedding(256, hidden) if timestep else None
        # model.prompt_context: the prompt's vector [N, hidden] through a zero-initialised
        # projection (so the model starts as it would without it), added to every token
        # as Imagen adds its pooled text embedding to the timestep's.
        self.context = None
        if context:
            self.context = nn.Linear(hidden, hidden)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] == 0:
            # A batch with no image (text only): diffusers' attention cannot reshape zero
            # images, so the blocks run on one blank image appended to the inputs and
            # dropped from the output. The graph is then the one a batch with images
            # builds, from the same inputs: under ZeRO-3 every rank gathers the same
            # weights in the same order, forward and backward (the prompt vectors' norm
            # included), and reduces their (here zero) gradients.
            def pad(a):
                return None if a is None else torch.cat([a, a.new_zeros(1, *a.shape[1:])])

            return self._run(pad(x), pad(t), pad(context))[:0]
        return self._run(x, t, context)

    def _run(self, x: torch.Tensor, t: torch.Tensor | None, context: torch.Tensor | None) -> torch.Tensor:
        if self.time is not None:
            x = x + _embed_time(self.time, t)[:, None, :].to(x.dtype)
        if self.context is not None:
            if context is None or context.shape != (x.shape[0], x.shape[-1]):
                raise ValueError(f"model.prompt_context: expected a context [{x.shape[0]}, {x.shape[-1]}], got "
                                 f"{None if context is None else tuple(context.shape)}")
            x = x + self.context(context.to(weight_dtype(self.context)))[:, None, :].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return x


class LinearEmbedder(nn.Module):
    def __init__(self, c: int, p: int, hidden: int):
        super().__init__()
        self.p = p
        self.proj = nn.Linear(c * p * p, hidden)
        self.time = _time_embedding(256, hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(patchify(x.to(weight_dtype(self.proj)), self.p))
        return _finish_tokens(self, tokens + _embed_time(self.time, t)[:, None, :].to(tokens.dtype))


class LinearPredictor(nn.Module):
    def __init__(self, c: int, p: int, hidden: int, h: int, w: int):
        super().__init__()
        self.p, self.c, self.h, self.w = p, c, h, w
        self.proj = nn.Linear(hidden, c * p * p)
        nn.init.zeros_(self.proj.weight)  # zero-init: see the module docstring
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return unpatchify(self.proj(_refine_hidden(self, hidden, t, context)), self.p, self.c, self.h, self.w)


class UNetEmbedder(nn.Module):
    def __init__(self, c: int, p: int, hidden: int, channels, layers: int):
        super().__init__()
        self.p = p
        ch0, temb = channels[0], 4 * channels[0]
        g = _groups(channels)
        self.time = _time_embedding(ch0, temb)
        self.conv_in = nn.Conv2d(c, ch0, 3, padding=1)
        blocks, prev = [], ch0
        for ch in channels:
            blocks.append(DownBlock2D(in_channels=prev, out_channels=ch, temb_channels=temb, num_layers=layers,
                                      resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=g, add_downsample=False))
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(g, prev, eps=1e-5)
        self.proj = nn.Linear(prev * p * p, hidden)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = _embed_time(self.time, t)
        h = self.conv_in(x.to(weight_dtype(self.conv_in)))
        for block in self.down_blocks:
            h, _ = block(h, temb)  # the per-layer outputs would be skips; unused (see top)
        h = nn.functional.silu(self.norm_out(h))
        return _finish_tokens(self, self.proj(patchify(h, self.p)))


class UNetPredictor(nn.Module):
    def __init__(self, c: int, p: int, hidden: int, channels, layers: int, h: int, w: int):
        super().__init__()
        self.p, self.h, self.w = p, h, w
        rev = list(channels)[::-1]
        ch0, temb = channels[0], 4 * channels[0]
        g = _groups(channels)
        self.time = _time_embedding(ch0, temb)
        self.proj = nn.Linear(hidden, rev[0] * p * p)
        blocks, prev = [], rev[0]
        for ch in rev:
            blocks.append(UpDecoderBlock2D(in_channels=prev, out_channels=ch, temb_channels=temb, num_layers=layers,
                                           resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=g, add_upsample=False))
            prev = ch
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(g, prev, eps=1e-5)
        self.conv_out = nn.Conv2d(prev, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero-init: see the module docstring
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, hidden: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        temb = _embed_time(self.time, t)
        x = self.proj(_refine_hidden(self, hidden, t, context))
        x = unpatchify(x, self.p, self.proj.out_features // (self.p * self.p), self.h, self.w)
        for block in self.up_blocks:
            x = block(x, temb)
        return self.conv_out(nn.functional.silu(self.norm_out(x)))


# --- the tokenizer ----------------------------------------------------------------------

class ImageTokenizer(nn.Module):
    """VAE (frozen, optional) + trainable patcher in and out. See the module docstring.

    `sides` builds the input side ("embedder", with the VAE) and/or the output side
    ("predictor"); a pipeline stage builds only the side it owns (build_side). Each side
    draws its initial weights from its own seed, both derived from side_seed (by default
    one draw of the global RNG, draw_seed), so one side built alone equals that side of
    the whole tokenizer.
    """

    SIDES = ("embedder", "predictor")

    def __init__(self, cfg: FusionConfig, hidden_size: int, sides: tuple[str, ...] = SIDES,
                 side_seed: int | None = None, vae_loader=None):
        super().__init__()
        if cfg.patcher not in ("linear", "unet"):
            raise ValueError(f"model.patcher={cfg.patcher!r}: expected one of linear, unet")
        if cfg.patcher == "unet" and not tuple(cfg.unet_channels):
            raise ValueError("model.unet_channels is empty")
        self.cfg = cfg
        self.latent_shape = image_latent_shape(cfg)
        self.vae: AutoencoderKL | None = None
        self.pixel_scale = float(getattr(cfg, "pixel_scale", 1.0))
        c, h, w = self.latent_shape
        p = self.patch_size = cfg.patch_size
        self.grid = (h // p, w // p)
        self.tokens_per_image = self.grid[0] * self.grid[1]
        self.hidden_size = hidden_size
        self._side_seed = self.draw_seed() if side_seed is None else int(side_seed)
        # tools/plan.py builds the model on the meta device and passes a loader that makes
        # the VAE from its config alone (no weights read).
        self._vae_loader = vae_loader or load_vae
        for side in sides:
            self.build_side(side)

    @staticmethod
    def draw_seed() -> int:
        return int(torch.randint(0, 2**62, (), device="cpu").item())

    def build_side(self, side: str) -> None:
        cfg, (c, h, w), p, hidden = self.cfg, self.latent_shape, self.patch_size, self.hidden_size
        channels = tuple(int(x) for x in cfg.unet_channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._side_seed + self.SIDES.index(side))
            if side == "embedder":
                # Registered as a submodule so .to() moves it, but frozen: requires_grad
                # False, always in eval mode, never among the trainable parameters.
                self.vae = self._vae_loader(cfg.vae_path) if cfg.image_mode == "vae" else None
                self.embedder = (LinearEmbedder(c, p, hidden) if cfg.patcher == "linear"
                                 else UNetEmbedder(c, p, hidden, channels, cfg.unet_layers_per_block))
                self._add_position_table(self.embedder)
                if cfg.patcher_layers and cfg.patcher_sides == "both":
                    self.embedder.blocks = ImageBlocks(hidden, cfg.patcher_layers)
            else:
                self.predictor = (LinearPredictor(c, p, hidden, h, w) if cfg.patcher == "linear"
                                  else UNetPredictor(c, p, hidden, channels, cfg.unet_layers_per_block, h, w))
                if cfg.patcher_layers:
                    self._add_position_table(self.predictor)
                    self.predictor.blocks = ImageBlocks(hidden, cfg.patcher_layers, timestep=True,
                                                        context=cfg.prompt_context)

    def _add_position_table(self, side: nn.Module) -> None:
        """model.image_position's table [1, tokens_per_image, hidden] as side.position."""
        hidden, position = self.hidden_size, getattr(self.cfg, "image_position", "none")
        if position == "learned":
            # ViT's learned absolute position embedding, one row per patch of the grid,
            # drawn as ViT draws its own (normal, std 0.02).
            side.position = nn.Parameter(torch.randn(1, self.tokens_per_image, hidden) * 0.02)
        elif position == "sincos":
            # DiT's and MAE's 2D sine-cosine table (diffusers' own), centred over the grid,
            # trained from there. On a small grid most of its frequencies barely turn: on
            # 4x4 tokens its mean is rms 0.63 of its 0.71, a constant shift of every image
            # token that slowed the demo's diffusion loss (1.55 against 0.65 after 280
            # steps); what varies with the place (rms 0.32) is the size of a patch
            # embedding, where a std-0.02 table is lost beside the noisy patch and the
            # timestep.
            if hidden % 4:
                raise ValueError(f"model.image_position=sincos needs a hidden size divisible by 4, not {hidden}")
            table = get_2d_sincos_pos_embed(hidden, self.grid, output_type="pt").float()
            table = table - table.mean(0, keepdim=True)
            side.position = nn.Parameter(table.reshape(1, self.tokens_per_image, hidden))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N,3,H,W] in [-1,1] -> latents [N,C,h,w] in the input's dtype.

        VAE: vae_encode (the same function that writes pre-encoded shards). Pixel mode:
        pixels times model.pixel_scale.
        """
        if self.vae is None:
            return pixels * self.pixel_scale if self.pixel_scale != 1.0 else pixels
        if pixels.shape[0] == 0:
            # diffusers' VAE attention cannot reshape zero images, but the VAE still runs,
            # on one blank image whose latents are dropped: under ZeRO-3 every rank
            # gathers its parameters collectively, and a rank with no image in its batch
            # must take part (as understanding.blank does for a LLaVA's encoder).
            size = self.cfg.image_size
            vae_encode(self.vae, pixels.new_zeros((1, 3, size, size)))
            return pixels.new_zeros((0, *self.latent_shape))
        return vae_encode(self.vae, pixels).to(pixels.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [N,C,h,w] -> pixels [N,3,H,W], nominally in [-1,1] (not clamped)."""
        if self.vae is None:
            return latents / self.pixel_scale if self.pixel_scale != 1.0 else latents
        return vae_decode(self.vae, latents).to(latents.dtype)

    def embed(self, noisy: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """noisy latents [N,C,h,w], t [N] (our convention, 0 = clean) ->
        (tokens [N, tokens_per_image, hidden], aux = t)."""
        if tuple(noisy.shape[1:]) != self.latent_shape:
            raise ValueError(f"image shape {tuple(noisy.shape[1:])} != latent_shape {self.latent_shape}")
        t = torch.as_tensor(t, device=noisy.device).float().reshape(noisy.shape[0])
        return self.embedder(noisy, t), t

    def predict(self, hidden: torch.Tensor, aux: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, tokens_per_image, hidden] (the transformer's last hidden states at
        the image positions) -> prediction [N,C,h,w] in latent space. context [N, hidden]:
        each image's prompt vector (model.prompt_context; routing.prompt_vectors builds it)."""
        if hidden.dim() != 3 or hidden.shape[1] != self.tokens_per_image:
            raise ValueError(f"hidden shape {tuple(hidden.shape)}: expected [N, {self.tokens_per_image}, {self.hidden_size}]")
        return self.predictor(hidden, aux, context)
