import pytest


@pytest.mark.slow
def test_bf16_zero3_checkpointed_gradients_match_fp32_copy(run_two_ranks):
    """Issue 11 CPU stand-in: bf16 + zero_init + activation checkpointing + U-Net under
    ZeRO-3 on two ranks (see production_precision_worker.py). Training and bitwise
    resume with the same settings: tests/train/test_train.py."""
    text = run_two_ranks("production_precision_worker.py")
    assert text.count("PRODUCTION_OK") == 2, text[-4000:]
