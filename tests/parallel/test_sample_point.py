"""A sample point where rank 0 works alone (whole-weight sampling, log.sample_eval_n)
must not let the other ranks run ahead into validation: streaming's non-leader ranks wait
only download_timeout (60 s) for the leader to copy the val index, and a demo-long run
died that way at its first sample point."""
import json

import pytest


@pytest.mark.slow
def test_other_ranks_wait_for_rank_0s_sample_point(run_two_ranks, synthetic_shards, tmp_path):
    out, slow = tmp_path / "out", 6.0
    run_two_ranks("sample_sync_worker.py", str(out), str(slow), f"run.dir={tmp_path / 'run'}",
                  f"data.train={synthetic_shards}", f"data.val={synthetic_shards}/val",
                  f"data.run_id=sync-{tmp_path.name}", "train.steps=1", "log.sample_every=1", "log.val_every=1",
                  "log.val_batches=1", "log.sample_per_prompt=1", "log.sample_diffusion_steps=2",
                  "log.sample_caption_tokens=2", "parallel.zero_stage=0", "log.tensorboard=false",
                  "checkpoint.every=0")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    sampled0 = next(t for kind, step, t in ranks[0] if kind == "sampled")
    validating1 = next(t for kind, step, t in ranks[1] if kind == "validating")
    # Rank 1 may start validating only after rank 0 has finished its sample point.
    assert validating1 >= sampled0, (validating1 - sampled0, ranks)
