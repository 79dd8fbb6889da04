import pytest


@pytest.fixture(scope="module")
def both_bases(run_two_ranks, tiny_llava_only):
    """The tiny Llama (group 0) and the tiny LLaVA (group 1) built in one two-rank launch."""
    return run_two_ranks("zero_init_worker.py", "--then", f"model.base={tiny_llava_only}")


@pytest.mark.slow
def test_zero_init_builds_partitioned_twins(both_bases):
    assert both_bases.count("ZERO_INIT_OK group 0") == 2, both_bases[-4000:]
    assert "ZERO_INIT_VLM_OK group 0" not in both_bases


@pytest.mark.slow
def test_zero_init_builds_a_llava_base_partitioned(both_bases):
    """LLaVAFusion under parallel.zero_init: rank 0 reads the VLM's files by key, every
    rank holds partitions of its language model, image-tower twins and vision parts."""
    assert both_bases.count("ZERO_INIT_OK group 1") == 2, both_bases[-4000:]
    assert both_bases.count("ZERO_INIT_VLM_OK group 1") == 2, both_bases[-4000:]
