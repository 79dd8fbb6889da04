import pytest


# Each group a fresh model and engine in one launch (mixed_modality_worker.py's --then).
GROUPS = [
    (),
    # the learned position table and x-prediction under ZeRO-3: the table is gathered with
    # the embedder, and the velocity of the predicted x0 is what is differentiated
    ("model.objective=rectified_flow", "model.prediction_type=sample", "model.image_position=learned"),
    # X-Fusion's designs: two attention streams, the mix scalars and the gate are
    # parameters every rank must gather and reduce; single_tower trains the base's modules
    ("model.tower_mode=xfuse",),
    ("model.tower_mode=gated_tower",),
    ("model.tower_mode=single_tower", "model.train_text_tower=true", "train.text_lr=1e-4"),
    # image-only blocks on both sides of a U-Net patcher, reading the prompt's vector: on
    # zero images they run on a blank one, and the vector's norm runs on no rows, so the
    # text-only rank's backward gathers what an image rank's does (before: a mismatch)
    ("model.patcher=unet", "model.unet_channels=[32,64]", "model.patcher_layers=1", "model.prompt_context=true"),
]


@pytest.mark.slow
def test_zero3_rank_without_images_matches_reference_gradients(run_two_ranks, tmp_path, tiny_llama_untied):
    """Every group above, feature alignment (model.align_encoder), a VAE encoding pixels
    in the forward pass (shards without latents) and one decoding latents for the
    alignment: the rank whose batch is text only still runs the frozen encoders and
    decoder (on a blank image) and the projection, whose parameters are gathered
    collectively, and every trainable gradient, the projection's included, equals the
    plain copy's. (Before, the VAE was skipped for zero images: "Received data size
    doesn't match expected size" from gloo.)"""
    import torch
    import transformers
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    enc = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4))
    enc.save_pretrained(tmp_path / "clip")
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(tmp_path / "vae")
    align = (f"model.align_encoder={tmp_path / 'clip'}", "model.align_layer=1")
    vae = ("model.image_mode=vae", f"model.vae_path={tmp_path / 'vae'}", "model.patch_size=2")
    # The VAE encoding pixels (data.use_latents=false), and decoding latents for the
    # alignment's encoder (before: skipped on the text-only rank, a collective mismatch).
    # An untied base: nothing of megafusion's holds its embedding (the worker checks; the
    # forward once read embed_tokens.weight, which ZeRO-3 then held all step).
    groups = [*GROUPS, align, (*vae, "data.use_latents=false"), (*vae, *align), (f"model.base={tiny_llama_untied}",)]
    args = []
    for i, g in enumerate(groups):
        args += (["--then"] if i else []) + list(g)
    text = run_two_ranks("mixed_modality_worker.py", *args)
    for g in groups:
        label = " ".join(g) or "defaults"
        assert text.count(f"MIXED_OK rank 0 [{label}]") == 1 and text.count(f"MIXED_OK rank 1 [{label}]") == 1, \
            (label, text[-4000:])
