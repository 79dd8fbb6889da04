"""A run restarted in the same run.dir with a config that builds another model is
refused in one line before DeepSpeed loads a tensor of the wrong size (without the
check: "RuntimeError: The size of tensor a (408) must match the size of tensor b (344)"
from inside DeepSpeed's loader)."""
import pytest
from test_train import metrics, run

pytestmark = pytest.mark.slow


def test_resume_with_another_model_is_refused_in_one_line(tmp_path, tiny_llama, synthetic_shards):
    run_dir = tmp_path / "run"
    code, out = run(run_dir, synthetic_shards, 1, "checkpoint.every=1", ranks=1)
    assert code == 0, out[-3000:]
    # Patches of 2 pixels instead of 4: the image tower's patch embedder and predictor
    # change shape.
    code, out = run(run_dir, synthetic_shards, 2, "checkpoint.every=1", "model.patch_size=2", ranks=1)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    assert "holds another model" in errors[0] and "image_tokenizer." in errors[0], errors
    assert "Traceback" not in out, out[-3000:]
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1]  # nothing trained on the wrong model
    # The same config resumes.
    code, out = run(run_dir, synthetic_shards, 2, "checkpoint.every=1", ranks=1)
    assert code == 0 and "at step 1" in out, out[-3000:]


def test_pipeline_stages_resume_past_the_check(tmp_path, tiny_llama, synthetic_shards):
    """Each pipeline stage holds only its own layers: each rank checks the shapes its
    own stage saved."""
    run_dir = tmp_path / "run"
    pipeline = ("parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json",
                "train.gradient_accumulation=2", "checkpoint.every=1")
    code, out = run(run_dir, synthetic_shards, 1, *pipeline)
    assert code == 0, out[-3000:]
    code, out = run(run_dir, synthetic_shards, 2, *pipeline)
    assert code == 0 and "at step 1" in out, out[-3000:]
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2]
