"""Configuration of the fused model (the `model` section of a run config).

Kept free of anything but the standard library so that the run-config loader, the data
pipeline and the exported Hugging Face code can all read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

TOWER_MODES = ("lmfusion", "dual_tower", "xfuse", "single_tower", "gated_tower")


@dataclass
class FusionConfig:
    # Base text-only LLM: a Hugging Face LlamaForCausalLM directory, or a .gguf file.
    base: str = "smollm2"
    # What a decoder layer does with its towers (megafusion/model/layer_*.py, one file each):
    # "lmfusion" (per-modality q/k/v/o, MLP and norms, one shared attention; X-Fusion's
    # Dual Projection), X-Fusion's "dual_tower" (a frozen text block and a trainable
    # vision block both read every token, each token keeps its own tower's output; its
    # linear layers cost lmfusion's plus one more q/k/v projection of every token) and
    # "xfuse" (dual_tower with a learned mix of both blocks' outputs at image tokens),
    # "single_tower" (one tower, every weight trainable: needs train_text_tower) and
    # "gated_tower" (the frozen LLM plus a tanh-gated trainable block for image tokens).
    # In a run config, X-Fusion's designs default to X-Fusion's recipe (megafusion/config.py,
    # XFUSION_DEFAULTS) where the config is silent.
    tower_mode: str = "lmfusion"

    # Attention backend: "auto" (on CUDA flash-attn for fp16/bf16 when installed, else
    # flex; sdpa on the CPU), "sdpa", "flex" or "flash" (fp16/bf16 only).
    attention_backend: str = "auto"
    # Recompute each decoder layer in the backward pass (saves activations).
    activation_checkpointing: bool = False
    # The image tower's RMSNorms: "none" (the base's LlamaRMSNorm) or "apex" (NVIDIA
    # apex's FusedRMSNorm, CUDA only, where installed; megafusion/model/fused_norm.py).
    fused_rmsnorm: str = "none"

    # Image space: "vae" (diffusers AutoencoderKL from vae_path) or "pixel" (raw RGB).
    image_mode: str = "pixel"
    vae_path: str | None = None
    # Pixel mode only: images enter as pixels in [-1, 1] times this factor, the pixel
    # twin of a VAE's scaling_factor (latents with about unit variance). The synthetic
    # shapes are flat colours on grey, std ~0.19 in [-1, 1]: unscaled, the noise
    # overwhelms them at a fifth of the way into the schedule, and most training
    # timesteps teach nothing about the shapes (configs/demo.yaml has the measurement).
    pixel_scale: float = 1.0
    image_size: int = 32  # pixels, square
    # Patching: "linear" (2x2 patches + timestep embedding) or "unet" (LMFusion's
    # U-Net down blocks in, up blocks out).
    patcher: str = "linear"
    patch_size: int = 2
    # "learned": a learned absolute position embedding per patch added to the image tokens
    # (ViT's, std 0.02 at first); "sincos": the same table started from DiT's 2D
    # sine-cosine one, centred over the grid; "none": the tokens know their place from the sequence's
    # RoPE alone (configs/demo.yaml has what each gives on the demo task).
    image_position: str = "none"
    # The images' RoPE positions (megafusion/model/image_rope.py). "sequential": an
    # image's tokens count on like text (Transfusion, LMFusion), so the copied text
    # weights' recency bias tells them apart by their raster index. "shared": every token
    # of an image at the image's first position (Qwen2-VL's M-RoPE t index alone), its
    # place in the grid only what image_position gives it. "2d": rows and columns as
    # RoPE offsets (Qwen3-VL's interleaved M-RoPE); text keeps exactly its 1D RoPE.
    image_rope: str = "sequential"
    unet_channels: tuple[int, ...] = (64, 128)
    unet_layers_per_block: int = 1
    # Image-only transformer blocks on each side of the patcher (DiT's blocks: trained
    # from scratch, bidirectional over one image's tokens, head size 64): the input side
    # runs them after the patch embedding, the output side before the patch projection,
    # with its own timestep embedding and position table. The copied text weights hardly
    # let an image's tokens attend to each other (configs/demo.yaml has the measurement);
    # these blocks do from the first step. 0: none (LMFusion, X-Fusion).
    patcher_layers: int = 0
    # Which sides get those blocks: "both", or "output" (only before the patch
    # projection, where model.prompt_context is read; the tower's input is then the
    # plain patcher's, as LMFusion's).
    patcher_sides: str = "both"
    # The output side's blocks also read the prompt's vector: the text tower's last
    # hidden state (after its final norm) at the token just before the image, its BOI,
    # which has read the whole prompt (SD3's and Imagen's pooled text vector, taken from
    # the fused model's own text tower). A linear read-out of SmolLM2's vector there
    # names a one-object caption's colour, shape, size and position on 100% of held-out
    # captions, at every layer from the first. Needs patcher_layers >= 1.
    prompt_context: bool = False

    # Diffusion: "ddpm" (epsilon prediction, cosine schedule) or "rectified_flow".
    objective: str = "ddpm"
    # What the network predicts under ddpm: "epsilon" (the noise: LMFusion, Transfusion)
    # or "v_prediction" (v = sqrt(ab) noise - sqrt(1 - ab) x0: well conditioned at high
    # noise, where epsilon's x0 estimate divides errors by sqrt(ab)). Under rectified flow
    # the loss and the sampler use the velocity noise - x0; the network predicts it
    # ("epsilon", the default name for "the objective's own target") or predicts the clean
    # image x0 ("sample"; Li & He's JiT: the velocity is then (x_t - x0) / sigma, and the
    # network need not carry the noise through its layers), or EDM's preconditioned
    # output ("edm": x0 = c_skip x_t + c_out F, x-prediction at high noise and epsilon at
    # low, unit-variance targets throughout; RectifiedFlow.velocity has the formulas).
    prediction_type: str = "epsilon"
    # prediction_type edm only: the data's standard deviation (EDM's sigma_data). The demo's
    # pixels in [-1, 1] times pixel_scale 5 measure 0.97; normalised VAE latents are ~1.
    sigma_data: float = 1.0
    num_train_timesteps: int = 1000
    # Rectified flow only: SD3's timestep shift s (sigma -> s sigma / (1 + (s - 1) sigma))
    # on the training sigmas and the sampler's alike; s > 1 trains and samples more at high
    # noise, where the layout is decided. Data scaled by k (pixel_scale) has every SNR
    # k^2 higher, and s = k puts the schedule back where it was (configs/demo.yaml).
    flow_shift: float = 1.0
    # Rectified flow only: how training draws sigma before the shift, by diffusers'
    # compute_density_for_timestep_sampling (SD3's schemes): "logit_normal" (sigmoid of
    # N(flow_logit_mean, flow_logit_std); a positive mean trains noisier, as in the SD3
    # paper), "uniform" (the original rectified flow's), or "mode" (flow_mode_scale).
    # logit_normal(0, 1) puts 1.4% of the draws above sigma 0.9, where a caption's
    # position words decide an image's layout once pixel_scale has raised every SNR
    # (configs/demo.yaml has what each gives on the demo task).
    flow_timesteps: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_mode_scale: float = 1.29
    # Images that serve as a condition (image before its caption) are noised at most to
    # this timestep; 0 means they are always clean.
    condition_t_cap: int = 500
    # Share of condition images shown exactly clean (t = 0); the rest are noised up to
    # condition_t_cap. Captioning at inference always sees a clean image, and X-Fusion
    # found clean condition images best for both tasks; on the demo task 1.0 did not beat
    # 0.0 on held-out caption NLL (configs/demo.yaml has the figures), hence 0.0.
    condition_clean_share: float = 0.0
    # Total loss = lm_loss_weight * lm + diffusion_loss_weight * diffusion (LMFusion and
    # Transfusion: 1 and 5; X-Fusion: 0.2 and 1).
    lm_loss_weight: float = 1.0
    diffusion_loss_weight: float = 5.0
    # Transfusion puts no loss on the begin-of-image token; turn on to let the model
    # learn to start images by itself (interleaved generation).
    lm_loss_on_boi: bool = False

    # Feature alignment (X-Fusion's REPA-style loss; megafusion/model/align.py): a local
    # CLIPVisionModel, SiglipVisionModel or Dinov2Model directory (frozen); the image tower's
    # hidden states after decoder layer align_layer (1-based; X-Fusion: 8) are projected
    # to its patch features and the loss 1 - cosine, times align_weight, joins the total.
    # align_feature_layer: which of the encoder's hidden states (None: CLIP's penultimate,
    # as X-Fusion; the last for SigLIP and DINOv2). X-Fusion found it speeds up 1B models
    # (~2.4x), helps less at 3B and slightly hurts at 8B.
    align_encoder: str | None = None
    align_layer: int = 8
    align_weight: float = 1.0
    align_feature_layer: int | None = None

    # Learning rate multiplier bookkeeping lives in the trainer; these only say which
    # parameters are trainable.
    train_text_tower: bool = False

    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        choices = {
            "tower_mode": TOWER_MODES,
            "attention_backend": ("auto", "sdpa", "flex", "flash"),
            "fused_rmsnorm": ("none", "apex"),
            "image_mode": ("vae", "pixel"),
            "patcher": ("linear", "unet"),
            "image_position": ("none", "learned", "sincos"),
            "image_rope": ("sequential", "shared", "2d"),
            "objective": ("ddpm", "rectified_flow"),
            "prediction_type": ("epsilon", "v_prediction", "sample", "edm"),
            "flow_timesteps": ("logit_normal", "uniform", "mode"),
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r}: expected one of {', '.join(allowed)}")
        if self.tower_mode == "single_tower" and not self.train_text_tower:
            raise ValueError("model.tower_mode=single_tower trains every weight of its one tower: "
                             "set model.train_text_tower=true (and train.text_lr > 0)")
        if self.image_mode == "vae" and not self.vae_path:
            raise ValueError("model.image_mode=vae needs model.vae_path (an AutoencoderKL directory)")
        if self.objective == "ddpm" and self.prediction_type in ("sample", "edm"):
            raise ValueError(f"model.prediction_type={self.prediction_type!r} is for objective rectified_flow")
        if self.objective == "rectified_flow" and self.prediction_type not in ("epsilon", "sample", "edm"):
            raise ValueError(f"model.prediction_type={self.prediction_type!r} is for objective ddpm; "
                             "rectified flow takes epsilon (its velocity), sample (x0) or edm (preconditioned)")
        if not self.sigma_data > 0:
            raise ValueError(f"model.sigma_data={self.sigma_data} must be > 0")
        if self.sigma_data != 1.0 and self.prediction_type != "edm":
            raise ValueError(f"model.sigma_data={self.sigma_data} is for model.prediction_type edm")
        if not 0 <= self.condition_t_cap <= self.num_train_timesteps:
            raise ValueError(f"model.condition_t_cap={self.condition_t_cap} outside [0, {self.num_train_timesteps}]")
        align = [f.name for f in fields(self) if f.name.startswith("align_") and f.name != "align_encoder"
                 and getattr(self, f.name) != f.default]
        if align and not self.align_encoder:
            raise ValueError(f"model.{align[0]}={getattr(self, align[0])!r} is for model.align_encoder (not set)")
        if self.align_encoder and (self.align_layer < 1 or not self.align_weight > 0):
            raise ValueError(f"model.align_layer={self.align_layer} must be >= 1 and model.align_weight="
                             f"{self.align_weight} > 0")
        if self.lm_loss_weight < 0 or self.diffusion_loss_weight < 0:
            raise ValueError(f"model.lm_loss_weight={self.lm_loss_weight} and model.diffusion_loss_weight="
                             f"{self.diffusion_loss_weight} must be >= 0")
        if self.patcher_layers < 0:
            raise ValueError(f"model.patcher_layers={self.patcher_layers} must be >= 0")
        if self.patcher_sides not in ("both", "output"):
            raise ValueError(f"model.patcher_sides={self.patcher_sides!r}: expected one of both, output")
        if self.prompt_context and self.patcher_layers < 1:
            raise ValueError("model.prompt_context is read by the output side's image-only blocks: it needs "
                             "model.patcher_layers >= 1")
        if self.image_rope == "shared" and self.image_position == "none":
            raise ValueError("model.image_rope=shared gives an image's tokens one position; they need "
                             "model.image_position (sincos or learned) to know where they sit")
        if not self.pixel_scale > 0:
            raise ValueError(f"model.pixel_scale={self.pixel_scale} must be > 0")
        if not self.flow_shift > 0:
            raise ValueError(f"model.flow_shift={self.flow_shift} must be > 0")
        if self.flow_shift != 1.0 and self.objective != "rectified_flow":
            raise ValueError(f"model.flow_shift={self.flow_shift} is for objective rectified_flow")
        if not self.flow_logit_std > 0:
            raise ValueError(f"model.flow_logit_std={self.flow_logit_std} must be > 0")
        flow_fields = ("flow_timesteps", "flow_logit_mean", "flow_logit_std", "flow_mode_scale")
        changed = [f.name for f in fields(self) if f.name in flow_fields and getattr(self, f.name) != f.default]
        if changed and self.objective != "rectified_flow":
            raise ValueError(f"model.{changed[0]}={getattr(self, changed[0])!r} is for objective rectified_flow")
        if not 0.0 <= self.condition_clean_share <= 1.0:
            raise ValueError(f"model.condition_clean_share={self.condition_clean_share} outside [0, 1]")
