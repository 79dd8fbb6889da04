import pytest


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    (),
    # the learned position table and x-prediction under ZeRO-3: the table is gathered with
    # the embedder, and the velocity of the predicted x0 is what is differentiated
    ("model.objective=rectified_flow", "model.prediction_type=sample", "model.image_position=learned"),
], ids=["default", "x0_position_table"])
def test_zero3_rank_without_images_matches_reference_gradients(run_two_ranks, overrides):
    text = run_two_ranks("mixed_modality_worker.py", *overrides)
    assert text.count("MIXED_OK") == 2, text[-4000:]
