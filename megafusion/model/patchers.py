"""The trainable patchers: latents in, tokens out (embedder) and hidden states in,
latents out (predictor); ImageTokenizer (image_io.py) builds one of each side.

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

model.patcher_layers=N adds N image-only transformer blocks (ImageBlocks, trained from
scratch, bidirectional over one image's tokens) on each side (model.patcher_sides=both)
or on the output side only (output): after the embedder's patch embedding, timestep and
position table, and before the predictor's projection, where the transformer's hidden
states get the predictor's own timestep embedding and position table first (and, with
model.prompt_context, the prompt's vector). They live inside `embedder` and `predictor`,
so the sides stay disjoint and a pipeline stage still owns whole sides.

The last layer of the output side is initialised to zero, so the first prediction is
exactly 0: the loss starts at its trivial value (E[eps^2] = 1 for epsilon prediction)
instead of a random prediction's much larger error, and the randomly initialised image
path sends no noise-dominated gradients into the image tower (which starts as a copy of
the pretrained text weights) on the first step (DiT/ControlNet's zero-init).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UpDecoderBlock2D


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
