import pytest


@pytest.mark.slow
def test_zero3_rank_without_images_matches_reference_gradients(run_two_ranks):
    text = run_two_ranks("mixed_modality_worker.py")
    assert text.count("MIXED_OK") == 2, text[-4000:]
