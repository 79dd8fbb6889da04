"""The planner at start-up (megafusion/plan/fit_check.py): a run whose configured setting
will not fit its GPUs says so before the base loads, in one line, and still runs."""
import sys
from pathlib import Path

import pytest

from megafusion.config import load_config
from megafusion.plan.choose import plan
from megafusion.plan.fit_check import memory_warning
from megafusion.plan.hardware import RESERVE, gpu
from megafusion.plan.shapes import model_shape

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "train"))


def test_the_70b_setting_fits_an_h100_and_not_an_a100_40gb():
    """configs/llama3_70b.yaml on 8 nodes: the README's table has it fitting 80 GB
    H100s; a 40 GB A100 gets the warning, with the figure tools/plan.py prints."""
    cfg = load_config(REPO / "configs" / "llama3_70b.yaml")
    assert memory_warning(cfg, 64, 8, float(80 * 2**30)) is None
    line = memory_warning(cfg, 64, 8, float(40 * 2**30))
    table = plan(cfg, model_shape(cfg), 8, 8, gpu("h100-80gb"))["configured"]
    assert line.startswith("warning: tools/plan.py estimates") and "\n" not in line
    assert f"{table.memory['total'] / 1e9:.1f} GB per GPU" in line, line
    assert f"{(40 * 2**30 - RESERVE) / 1e9:.1f} GB" in line and "--nodes 8" in line, line
    assert memory_warning(cfg, 64, 8, None) is None  # not a CUDA device


def test_a_model_the_planner_cannot_read_gets_no_warning_and_no_error(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.base={tmp_path / 'nothing-here'}"])
    assert memory_warning(cfg, 2, 2, float(RESERVE)) is None


@pytest.mark.slow
def test_a_run_that_will_not_fit_warns_once_before_loading_and_trains(tmp_path, tiny_llama, synthetic_shards):
    """Two CPU ranks whose device reports (as a CUDA device's properties would) just the
    planner's reserve: rank 0 alone warns, before the model is built, and the run goes
    on."""
    from test_train import INSTRUMENTED, metrics, run

    code, out = run(tmp_path / "run", synthetic_shards, 2, script=INSTRUMENTED,
                    env={"MEGAFUSION_TEST_DEVICE_MEMORY": str(RESERVE + 2**20)})
    assert code == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning: tools/plan.py estimates")]
    assert len(warnings) == 1, out[-3000:]
    assert "(ZeRO-3, micro-batch 2 x 1 accumulated, 2 GPUs)" in warnings[0], warnings
    assert out.index(warnings[0]) < out.index("this rank holds:"), out[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run") if "loss" in r] == [1, 2]
