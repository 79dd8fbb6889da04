"""Fixtures of the evaluation tests (defined in eval_models.py, which
tests/tools/test_evaluate.py shares)."""
from eval_models import clip_dir, inception_weights, tiny_export, val_shards  # noqa: F401
