import pytest


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    (),
    # the learned position table and x-prediction under ZeRO-3: the table is gathered with
    # the embedder, and the velocity of the predicted x0 is what is differentiated
    ("model.objective=rectified_flow", "model.prediction_type=sample", "model.image_position=learned"),
    # X-Fusion's designs: two attention streams, the mix scalars and the gate are
    # parameters every rank must gather and reduce; single_tower trains the base's modules
    ("model.tower_mode=xfuse",),
    ("model.tower_mode=gated_tower",),
    ("model.tower_mode=single_tower", "model.train_text_tower=true", "train.text_lr=1e-4"),
], ids=["default", "x0_position_table", "xfuse", "gated_tower", "single_tower"])
def test_zero3_rank_without_images_matches_reference_gradients(run_two_ranks, overrides):
    text = run_two_ranks("mixed_modality_worker.py", *overrides)
    assert text.count("MIXED_OK") == 2, text[-4000:]


@pytest.mark.slow
def test_zero3_feature_alignment_on_a_rank_without_images(run_two_ranks, tmp_path):
    """model.align_encoder under ZeRO-3: the rank whose batch is text only still runs the
    frozen encoder and the projection (their parameters are gathered collectively), and
    every trainable gradient, the projection's included, equals the plain copy's."""
    import transformers

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    enc = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=4))
    enc.save_pretrained(tmp_path / "clip")
    text = run_two_ranks("mixed_modality_worker.py", f"model.align_encoder={tmp_path / 'clip'}", "model.align_layer=1")
    assert text.count("MIXED_OK") == 2, text[-4000:]
