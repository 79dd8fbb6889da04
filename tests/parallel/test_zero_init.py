import pytest


@pytest.mark.slow
def test_zero_init_builds_partitioned_twins(run_two_ranks):
    text = run_two_ranks("zero_init_worker.py")
    assert text.count("ZERO_INIT_OK") == 2, text[-4000:]


@pytest.mark.slow
def test_zero_init_builds_a_llava_base_partitioned(run_two_ranks, tiny_llava_only):
    """LLaVAFusion under parallel.zero_init: rank 0 reads the VLM's files by key, every
    rank holds partitions of its language model, image-tower twins and vision parts."""
    text = run_two_ranks("zero_init_worker.py", f"model.base={tiny_llava_only}")
    assert text.count("ZERO_INIT_OK") == 2 and text.count("ZERO_INIT_VLM_OK") == 2, text[-4000:]
