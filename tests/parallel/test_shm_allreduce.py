"""The flat gradients' shared-memory all-reduce (DeepSpeed's deepspeed_shm_comm op, kept
by launch.init_distributed(shm_allreduce=True)) on real local ranks: the sum is every
rank's gradients added up (for two ranks, gloo's result to the bit), the
average and clipping equal DeepSpeed's clip_grad_norm_ on the engine's average (to the
bit for two ranks, where 1/2 scales exactly; within rounding for three), messages larger
than one slice are reduced slice by slice, a parameter that no gradient reached in a
step counts as zero (not as the step before's), and the /dev/shm files are gone once every
rank has mapped them. The trainer's end-to-end check is tests/train/test_train.py's
test_flat_gradients_equal_deepspeeds_own_reduction."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

WORKER = Path(__file__).with_name("shm_allreduce_worker.py")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks", [2, 3])
def test_shm_allreduce_sums_averages_and_clips_as_deepspeed(tmp_path, ranks):
    done = subprocess.run([*launcher_cmd(ranks), str(WORKER), str(tmp_path)], env=launcher_env(ranks),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    for r, res in enumerate(results):
        assert res["ready"], r
        assert res["files_left"] == [], res["files_left"]
        assert set(res["checks"]) == {str(1 << 30), "4096"}
        for checks in res["checks"].values():
            check(checks, ranks, r)
    # Every rank ends with the same gradients and norm.
    assert len({json.dumps(res["checks"]) for res in results}) == 1


def check(checks: dict, ranks: int, r: int) -> None:
    """One slice size's checks of rank r."""
    if ranks == 2:  # a + b: the same numbers whatever the order
        assert checks["sum"]["equals_rank_order_sum"] and checks["sum"]["equals_gloo"], (r, checks["sum"])
    else:  # the op adds in an order of its own (rank 0, then the last rank down)
        assert checks["sum"]["max_rel_err"] < 1e-6, (r, checks["sum"])
    assert checks["unused"]["zero"], (r, checks["unused"])
    assert checks["unused"]["others_max_rel_err"] < 1e-6, (r, checks["unused"])
    assert checks["0.001"]["clipped"] and not checks["1000000.0"]["clipped"]
    assert checks["0.0"]["norm"] is None
    for key in ("0.0", "0.001", "1000000.0"):
        c = checks[key]
        if ranks == 2:
            assert c["bitwise"], (r, key, c)
            assert c["norm"] == c["ref_norm"], (r, key, c)
        else:
            assert c["max_rel_err"] < 1e-6, (r, key, c)
            if c["ref_norm"] is not None:
                assert c["norm"] == pytest.approx(c["ref_norm"], rel=1e-6)
