"""zero_quantized_nontrainable_weights (ZeRO++'s int8 storage and gathers for frozen
weights) would suit the frozen text tower, but DeepSpeed applies it only to weights that
are frozen when their partition is made. Measured on two CPU ranks with a stand-in for
DeepSpeed's CUDA quantizer (quantized_frozen_worker.py), and refused by the preflight.
One rank suffices: which partitions DeepSpeed quantizes does not depend on how many there
are."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


@pytest.mark.slow
def test_deepspeed_quantizes_no_partition_of_the_frozen_tower(tiny_llama):
    cmd = [*launcher_cmd(1), str(REPO / "tests/parallel/quantized_frozen_worker.py"), str(REPO / "configs/tiny.yaml")]
    res = subprocess.run(cmd, cwd=REPO, env=launcher_env(1), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    reports = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("QUANTIZED_FROZEN ")]
    assert len(reports) == 1, out[-3000:]
    for r in reports:
        # The control shows the stand-in is called and a quantized partition is seen.
        assert r["control_quantized"] and r["control_dtype"] == "torch.int8", r
        assert r["frozen"] > 0 and r["quantized"] == [] and r["frozen_dtypes"] == ["torch.float32"], r


def test_preflight_refuses_quantized_nontrainable_weights_in_one_line(tmp_path, tiny_llama, synthetic_shards, capsys,
                                                                       monkeypatch):
    from megafusion.config import load_config
    from megafusion.parallel.preflight import preflight

    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    # Refused with CUDA too: the reason is the model, not the machine.
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    cfg = load_config(str(REPO / "configs/tiny.yaml"), [f"parallel.ds_config={tmp_path / 'ds.json'}",
                                                        f"data.train={synthetic_shards}"])
    with pytest.raises(SystemExit) as exc:
        preflight(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "zero_quantized_nontrainable_weights quantizes nothing" in err[0] and "CUDA" not in err[0], err
    assert "zero_quantized_weights" in err[0], err  # what to use instead
    # The same config without it passes this check (and fails only for want of CUDA).
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = False
    ds["zero_optimization"]["zero_quantized_weights"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(SystemExit):
        preflight(cfg)
    err = capsys.readouterr().err
    assert "nontrainable" not in err and "CUDA" in err, err
