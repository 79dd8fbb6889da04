"""The flat gradients' sum in buffers the ranks share in /dev/shm (shared_sum.py) on real
local ranks: every rank ends with every rank's gradients added up in rank order (for two
ranks, gloo's result to the bit), also where one rank sums an empty region; the average
and clipping equal DeepSpeed's clip_grad_norm_ on the engine's average (to the bit for two
ranks, where 1/2 scales exactly; within rounding for three); a parameter that no gradient
reached in a step counts as zero (not as the step before's); nothing is left in /dev/shm;
and where one rank cannot share (no directory, ranks that share none, no room) every rank
falls back to torch.distributed with the same numbers. The trainer's end-to-end check is
tests/train/test_train.py's test_flat_gradients_equal_deepspeeds_own_reduction."""
import json
import subprocess
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

WORKER = Path(__file__).with_name("shared_sum_worker.py")

pytestmark = pytest.mark.slow


FALLBACKS = ["no_dir", "not_shared", "full"]


def launch(tmp_path, ranks: int, cases: list[str]) -> dict[str, list[dict]]:
    """Every case in one launch (a launch is ~10 s of start-up here): {case: per-rank results}."""
    done = subprocess.run([*launcher_cmd(ranks), str(WORKER), str(tmp_path), ",".join(cases)],
                          env=launcher_env(ranks), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = {}
    for case in cases:
        results = [json.loads((tmp_path / case / f"rank{r}.json").read_text()) for r in range(ranks)]
        for res in results:
            assert res["files_left"] == [], res["files_left"]
        # Every rank ends with the same gradients and norms.
        assert len({json.dumps(res["checks"]) for res in results}) == 1
        results[0]["output"] = "".join(res["stderr"] for res in results)
        out[case] = results
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The shared case and every fallback on two ranks, one launch."""
    return launch(tmp_path_factory.mktemp("shared-sum"), 2, ["shared", *FALLBACKS])


@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_buffers_sum_average_and_clip_as_deepspeed(request, tmp_path, ranks):
    # Two ranks: the module's launch of every case; three: a launch of its own.
    results = (request.getfixturevalue("two_ranks") if ranks == 2 else launch(tmp_path, 3, ["shared"]))["shared"]
    assert "no shared gradient buffers" not in results[0]["output"]
    for r, res in enumerate(results):
        assert res["shared"], r
        assert set(res["checks"]) == {"regions", "empty_region"}
        for checks in res["checks"].values():
            check(checks, ranks, r)


@pytest.mark.parametrize("case", FALLBACKS)
def test_every_rank_falls_back_where_one_cannot_share(two_ranks, case):
    results = two_ranks[case]
    assert not any(res["shared"] for res in results)
    assert "gradients are all-reduced through torch.distributed instead" in results[0]["output"]
    for r, res in enumerate(results):
        for checks in res["checks"].values():
            check(checks, 2, r)


def check(checks: dict, ranks: int, r: int) -> None:
    """One parameter layout's checks of rank r."""
    assert checks["sum"]["equals_rank_order_sum"], (r, checks["sum"])
    if ranks == 2:  # a + b: the same numbers whatever the order
        assert checks["sum"]["equals_gloo"], (r, checks["sum"])
    assert checks["unused"]["zero"] and checks["unused"]["others_equal"], (r, checks["unused"])
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
