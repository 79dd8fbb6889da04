"""The frozen check without the base model (issue 11, blocker 3): a digest of each
rank's frozen shares at start-up, compared at the end. Here on one process with plain
tensors; tests/parallel/production_precision_worker.py checks ZeRO-3 partitions on two
ranks."""
import torch

from megafusion.parallel import frozen


def model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(dtype)
    m[0].requires_grad_(False)
    return m


def test_digest_covers_frozen_parameters_only():
    assert sorted(frozen.digest(model())) == ["0.bias", "0.weight"]


def test_any_changed_bit_of_a_frozen_weight_is_found():
    m = model()
    before = frozen.digest(m)
    assert frozen.changed(m, before) == []
    with torch.no_grad():
        bits = m[0].weight.view(torch.int16)
        bits[3, 5] ^= 1  # the smallest possible change: one mantissa bit
    assert frozen.changed(m, before) == ["0.weight"]


def test_sign_of_zero_counts_as_a_change():
    """Bytes, not values: -0.0 == 0.0 numerically, but it is not the same weight."""
    m = model(torch.float32)
    with torch.no_grad():
        m[0].bias[0] = 0.0
    before = frozen.digest(m)
    with torch.no_grad():
        m[0].bias[0] = -0.0
    assert frozen.changed(m, before) == ["0.bias"]


def test_trainable_weights_may_change():
    m = model()
    before = frozen.digest(m)
    with torch.no_grad():
        m[1].weight.add_(1.0)
    assert frozen.changed(m, before) == []


def test_check_unchanged_raises_with_the_names():
    m = model()
    before = frozen.digest(m)
    assert frozen.check_unchanged(m, before, "cpu") == 2
    with torch.no_grad():
        m[0].bias.add_(1.0)
    try:
        frozen.check_unchanged(m, before, "cpu")
    except SystemExit as exc:
        assert "frozen weights changed" in str(exc) and "0.bias" in str(exc)
    else:
        raise AssertionError("a changed frozen bias went unnoticed")
