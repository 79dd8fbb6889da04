"""Images in and out of the transformer.

pixels [N,3,H,W] in [-1,1] --encode_images--> latents [N,C,h,w]        (frozen VAE or identity)
noisy latents, t --embed--> tokens [N, tokens_per_image, hidden], aux  (trainable)
hidden [N, tokens_per_image, hidden], aux --predict--> [N,C,h,w]       (trainable; epsilon or velocity)
latents --decode_latents--> pixels in [-1,1]

The trainable patchers that turn latents into tokens and hidden states back into
latents, and the image-only blocks, are in patchers.py; this file holds the VAE, the
latent shape and ImageTokenizer, which puts them together.

model.image_position=learned adds a learned table [tokens_per_image, hidden] to the
embedder's tokens (ViT's absolute position embedding; embedder.position, std 0.02 at
first); image_position=sincos is the same table started from DiT's 2D sine-cosine one,
centred over the grid. Without it an image token knows where it sits only through
RoPE's relative offsets to the tokens it attends to, which the copied text weights do
not read as a place in a 2D grid.
model.image_rope (image_rope.py) chooses the RoPE positions of an image's tokens.

aux returned by embed is the timesteps t [N]; predict needs nothing else. The parameters
of the two sides are disjoint (`embedder`, `predictor`; each has its own timestep
embedding), so pipeline stages can own them without weight tying.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from diffusers import AutoencoderKL
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from .config import FusionConfig
from .patchers import ImageBlocks, LinearEmbedder, LinearPredictor, UNetEmbedder, UNetPredictor


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
