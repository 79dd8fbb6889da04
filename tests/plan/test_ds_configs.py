"""The large configs carry what tools/plan.py chose, and the settings it chose work:
fp32 gradient reduction on two CPU ranks, ZeRO++ refused in one line without CUDA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.config import load_config
from megafusion.plan.choose import choose_best, plan
from megafusion.plan.hardware import gpu
from megafusion.plan.report import ds_settings
from megafusion.plan.shapes import model_shape

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_plan import collective_bytes, run_worker  # noqa: E402


# The setting each large config had before the planner chose (the README and the config
# header quote its MFU beside the chosen one's).
EARLIER = {"llama3_8b.yaml": ["parallel.ds_config=ds_configs/zero3.json", "train.micro_batch_size=2",
                              "train.gradient_accumulation=4"],
           "llama3_70b.yaml": ["parallel.ds_config=ds_configs/zero3.json"]}


@pytest.mark.parametrize("config, nodes", [("llama3_8b.yaml", 4), ("llama3_70b.yaml", 8)])
def test_large_configs_carry_the_planners_choice(config, nodes):
    """Rerun the planner on the shipped config at the node count its Slurm script asks
    for: the best setting must be the one configured (a config edited by hand, or a
    planner change that moves the choice, fails here)."""
    cfg = load_config(REPO / "configs" / config)
    result = plan(cfg, model_shape(cfg), nodes, 8, gpu("h100-80gb"))
    assert result["best"].name.startswith("as configured"), result["best"].name
    # The keys are compared with the best of the settings the planner builds itself
    # (candidates), not with result["best"], which is read back from the shipped JSON.
    weighed = choose_best(result["weighed"])
    assert abs(weighed.step.mfu - result["best"].step.mfu) < 1e-9, (weighed.name, weighed.step.mfu)
    chosen = ds_settings(weighed)
    for key, value in chosen["run_config"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key
    shipped = json.loads((REPO / cfg.parallel.ds_config).read_text())
    for key, value in chosen["deepspeed"].items():
        if key == "zero_optimization":
            for k, v in value.items():
                assert shipped["zero_optimization"].get(k) == v, k
        else:
            assert shipped[key] == value, key
    script = (REPO / "slurm" / ("train_8b.sh" if "8b" in config else "train_70b.sh")).read_text()
    assert f"#SBATCH --nodes={nodes}" in script
    # The README's table for this config is the planner's table of today, row for row,
    # and the config's header and the Slurm script quote its memory and MFU.
    from megafusion.plan.report import format_plan

    table = format_plan(result, model_shape(cfg)).split("\n\n")[1].splitlines()
    readme = (REPO / "README.md").read_text()
    assert table[0].startswith("setting") and len(table) > 5, table
    assert all(f"    {row}\n" in readme for row in table), [row for row in table if f"    {row}\n" not in readme]
    best = result["best"]
    header = (REPO / "configs" / config).read_text()
    for text in (header, script):
        assert f"{100 * best.step.mfu:.1f}%" in text
        assert f"{best.memory['total'] / 1e9:.0f} GB per" in text
    # The earlier setting's MFU, as today's planner estimates it (a figure quoted once
    # and left behind by a planner change fails here).
    earlier_cfg = load_config(REPO / "configs" / config, EARLIER[config])
    earlier = plan(earlier_cfg, model_shape(earlier_cfg), nodes, 8, gpu("h100-80gb"))["configured"]
    for text in (header, readme):
        assert f"{100 * earlier.step.mfu:.1f}%" in text, (config, f"{100 * earlier.step.mfu:.1f}%")


@pytest.mark.slow
def test_gradients_are_reduced_and_accumulated_in_fp32(tmp_path, tiny_llama, synthetic_shards):
    """ds_configs/zero3_llama3_8b.json's precision keys on a bf16 run of two ranks: the
    step's reduce-scatter carries 4 bytes per trainable parameter (DeepSpeed's comms
    logger) and the gradient partitions are fp32 (2 bytes each in a plain bf16 run)."""
    shipped = json.loads((REPO / "ds_configs" / "zero3_llama3_8b.json").read_text())
    assert shipped["communication_data_type"] == "fp32" and shipped["data_types"]["grad_accum_dtype"] == "fp32"
    small = {"reduce_bucket_size": 1_000_000, "stage3_prefetch_bucket_size": 1_000_000,
             "stage3_max_live_parameters": 10_000_000, "stage3_max_reuse_distance": 10_000_000,
             "stage3_param_persistence_threshold": 0}
    run = run_worker(tmp_path, "fp32", [f"data.train={synthetic_shards}", "train.steps=1"], small,
                     base="zero3_llama3_8b.json")
    cfg = load_config(REPO / "configs/tiny.yaml")
    trainable = model_shape(cfg).trainable
    assert collective_bytes(run["collectives"], "reduce_scatter_tensor") == pytest.approx(4 * trainable, rel=0.01)
    assert run["held_bytes"]["grads"] == pytest.approx(4 * trainable / 2, rel=0.01)


def test_zero_plus_plus_is_refused_without_cuda_in_one_line(tiny_llama, synthetic_shards):
    res = subprocess.run([sys.executable, str(REPO / "megafusion/train.py"), "--config", str(REPO / "configs/tiny.yaml"),
                          "parallel.ds_config=ds_configs/zero3_llama3_70b.json", f"data.train={synthetic_shards}"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "zero_quantized_weights" in lines[0] and "CUDA" in lines[0], res.stderr
