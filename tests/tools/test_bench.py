"""tools/bench.py end to end at --quick sizes. No timing assertions: the machine is
shared and noisy; this checks that every entry runs and reports what it promises.

demo_step_vs_compute runs the real demo training on two ranks under the deepspeed
launcher (a few minutes even with --quick): the quick run leaves it out, its parts are
tested here without a launch, and test_demo_step_vs_compute_end_to_end runs it whole
when MEGAFUSION_BENCH_DEMO=1."""
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "tools" / "bench.py"
RATIO_ENTRIES = ("routing_vs_dense_finetune", "routing_vs_both_towers", "dual_tower_vs_lmfusion", "hybrid_vs_causal_attention")
LAUNCHER_ENTRIES = ("demo_step_vs_compute",)  # not in the quick run (see the module docstring)


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=1)
def unknown_entry_run():
    return run_bench("--only", "no_such_entry", timeout=120)


def known_entries() -> list[str]:
    """The registered entries, as the one-line error of an unknown --only lists them."""
    line = unknown_entry_run().stderr.strip().splitlines()[-1]
    return [n.strip() for n in line.split("known:", 1)[1].split(",")]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_json_has_every_entry_with_positive_ratios():
    entries = known_entries()
    assert set(LAUNCHER_ENTRIES) <= set(entries), entries
    quick = [n for n in entries if n not in LAUNCHER_ENTRIES]
    proc = run_bench("--json", "--quick", "--repeats", "1", "--only", ",".join(quick))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [n for n in report if n != "meta"] == quick

    meta = report["meta"]
    assert meta["torch"] and meta["threads"] >= 1 and meta["quick"] is True
    assert meta["sizes"]["layers"] >= 1 and meta["model"]["layers_used"] == meta["sizes"]["layers"]

    for name in RATIO_ENTRIES:
        entry = report[name]
        assert entry["unit"] == "ratio", (name, entry)
        assert positive(entry["value"]), (name, entry)
        assert positive(entry["goal"]) and entry["met"] == (entry["value"] <= entry["goal"]), (name, entry)
        assert len(entry["median_ms"]) == 2 and all(positive(v) for v in entry["median_ms"].values()), (name, entry)
        assert all(positive(v) for v in entry["median_wall_ms"].values()), (name, entry)

    # The alternative attention layouts compute the same function as the bool mask.
    for name, variant in report["hybrid_vs_causal_attention"]["variants"].items():
        assert positive(variant["ratio_vs_causal"]), name
        assert variant["max_abs_err_vs_bool_mask"] < 1e-4, (name, variant)

    # Depends on megafusion.data.bench_loader: a number, or null with the reason.
    loader = report["loader_samples_per_s"]
    assert positive(loader["value"]) or (loader["value"] is None and loader["reason"]), loader
    assert positive(report["loader_vs_train_step"]["value"]), report["loader_vs_train_step"]
    sampling = report["sampling_cached_vs_uncached"]
    assert positive(sampling["value"]) and sampling["goal"] == 0.7, sampling


def test_unknown_entry_is_a_one_line_error():
    proc = unknown_entry_run()
    assert proc.returncode == 2
    assert "no_such_entry" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------ demo_step_vs_compute

def test_demo_step_parts_read_the_config_and_the_metrics(tmp_path):
    from megafusion.config import load_config
    from tools import bench_demo

    # The settings and the launch come from the config as it is, not from constants.
    config, sha = bench_demo.snapshot_config(tmp_path)
    assert config.read_text() == (REPO / "configs" / "demo.yaml").read_text() and len(sha) == 12
    cfg = load_config(config, ["train.gradient_accumulation=3", "parallel.zero_stage=2", "model.image_size=16"])
    settings = bench_demo.demo_settings(cfg, samples_per_step=5)
    assert settings["ranks"] == 2 and settings["gradient_accumulation"] == 3 and settings["zero_stage"] == 2
    assert settings["image_size"] == 16 and settings["samples_per_step_resolved"] == 5
    assert settings["seq_len"] == cfg.data.seq_len and settings["num_workers"] == cfg.data.num_workers

    cmd = bench_demo.launch_command(config, tmp_path / "shards", tmp_path / "run", tmp_path / "cache", steps=7,
                                    port=29999, run_id="bench-x")
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:5] == ["--num_gpus", "2", "--master_port", "29999"]
    assert cmd[cmd.index("--config") + 1] == str(config)
    for override in (f"run.dir={tmp_path / 'run'}", f"data.train={tmp_path / 'shards'}", "data.val=null",
                     "data.run_id=bench-x", "train.steps=7", "checkpoint.every=0", "log.sample_every=0",
                     "log.val_every=0", "log.tensorboard=false"):
        assert override in cmd, (override, cmd)
    # Every override is one the trainer's config accepts.
    load_config(config, [a for a in cmd[cmd.index("--config") + 2:]])

    # step_s after the warm-up steps; a step written twice (resume) counts once, the last.
    rows = [{"step": 1, "step_s": 9.0}, {"step": 2, "step_s": 5.0}, {"step": 3, "step_s": 7.0},
            {"step": 3, "step_s": 2.0}, {"step": 4, "step_s": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench_demo.measured_step_s(tmp_path / "metrics.jsonl") == ([9.0, 5.0], [2.0, 3.0])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEGAFUSION_BENCH_DEMO") != "1",
                    reason="runs the demo's training on 2 ranks (minutes); set MEGAFUSION_BENCH_DEMO=1")
def test_demo_step_vs_compute_end_to_end():
    proc = run_bench("--json", "--quick", "--repeats", "1", "--only", "demo_step_vs_compute", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads(proc.stdout)["demo_step_vs_compute"]
    assert entry["unit"] == "ratio" and positive(entry["value"]), entry
    assert entry["goal"] == 1.3 and entry["met"] == (entry["value"] <= 1.3), entry
    assert positive(entry["median_step_s"]) and positive(entry["median_compute_s"]), entry
    assert entry["value"] == pytest.approx(entry["median_step_s"] / entry["median_compute_s"], rel=1e-3), entry
    assert entry["spread"][0] <= entry["value"] <= entry["spread"][1], entry
    assert len(entry["warmup_step_s"]) == 2 and len(entry["step_s"]) == entry["steps"] - 2 >= 1, entry
    assert entry["layers"] == json.loads(proc.stdout)["meta"]["full_depth_layers"], entry
    assert entry["parallel"]["ranks"] == 2 and "zero_stage" in entry["parallel"], entry
