"""tools/bench.py end to end at --quick sizes. No timing assertions: the machine is
shared and noisy; this checks that every entry runs and reports what it promises."""
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench.py"
RATIO_ENTRIES = ("routing_vs_dense_finetune", "routing_vs_both_towers", "hybrid_vs_causal_attention")


def run_bench(*args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_json_has_every_entry_with_positive_ratios():
    proc = run_bench("--json", "--quick", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

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
    proc = run_bench("--only", "no_such_entry", timeout=120)
    assert proc.returncode == 2
    assert "no_such_entry" in proc.stderr.strip().splitlines()[-1]
