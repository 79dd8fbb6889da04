import pytest


@pytest.mark.slow
def test_zero_init_builds_partitioned_twins(run_two_ranks):
    text = run_two_ranks("zero_init_worker.py")
    assert text.count("ZERO_INIT_OK") == 2, text[-4000:]
