"""ZeRO++'s quantized weight gathers (qwZ), which ds_configs/zero3_llama3_70b.json turns
on, run on CPU ranks: DeepSpeed's quantizer kernel is CUDA-only, so cpu_quantizer.py
stands in for the kernel and everything around it is DeepSpeed's and megafusion's own
(qwz_train_worker.py runs the real trainer). The tiny model's weights are all below
DeepSpeed's default persistence threshold, so the threshold is 0 here: every weight is
gathered, as every matrix of the 70B model is."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launchers import launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The large configs' precision and memory settings (test_production_precision.py).
PRODUCTION = ["train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true"]


def ds_json(tmp_path: Path, qwz: bool) -> Path:
    ds = json.loads((REPO / "ds_configs/zero3_llama3_70b.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds["zero_optimization"]["zero_quantized_weights"] = qwz
    ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}  # the recorder's counts
    path = tmp_path / ("qwz.json" if qwz else "exact.json")
    path.write_text(json.dumps(ds))
    return path


def train(ranks: int, ds: Path, run_dir: Path, shards: str, steps: int = 3) -> subprocess.CompletedProcess:
    cmd = [*launcher_cmd(ranks), str(REPO / "tests/parallel/qwz_train_worker.py"), str(REPO / "configs/tiny.yaml"),
           str(run_dir.with_name(run_dir.name + "-out.json")), *PRODUCTION, f"parallel.ds_config={ds}",
           f"data.train={shards}", f"run.dir={run_dir}", f"data.run_id=qwz-{run_dir.name}-{os.getpid()}",
           f"train.steps={steps}", "log.every=1"]
    return subprocess.run(cmd, cwd=REPO, env=launcher_env(ranks), capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def quantized(out: str) -> list[tuple[int, int]]:
    return [(int(calls), int(elements)) for calls, elements in re.findall(r"QWZ_QUANTIZED (\d+) (\d+)", out)]


def step_gathers(out: Path, step: int) -> int:
    """Bytes this rank received by all-gather in optimiser step `step`: DeepSpeed's comms
    logger records an all_gather_into_tensor by its input, the rank's own shard, which
    each of the N - 1 = 1 other ranks receives."""
    counts = json.loads(out.read_text())["after_step"]
    total = lambda c: sum(int(size) * n for size, n in c.get("all_gather_into_tensor", {}).items())
    return total(counts[step - 1]) - total(counts[step - 2])


def planned_gathers(tmp_path: Path, shards: str, qwz: bool) -> float:
    from megafusion.config import load_config
    from megafusion.plan.choose import configured_setting, evaluate
    from megafusion.plan.hardware import gpu
    from megafusion.plan.shapes import model_shape

    cfg = load_config(str(REPO / "configs/tiny.yaml"), [*PRODUCTION, f"parallel.ds_config={ds_json(tmp_path, qwz)}",
                                                        f"data.train={shards}"])
    s = configured_setting(cfg, 2)
    assert s.quantized_weights == qwz and s.persistence == 0
    est = evaluate(model_shape(cfg), s, 2, 2, gpu("h100-80gb"), seq_len=cfg.data.seq_len, caption_tokens=32,
                   efficiency=0.5, frozen_text=True)
    return sum(t.bytes for t in est.step.traffic if t.kind.startswith("weight all-gather"))


@pytest.mark.slow
def test_qwz_trains_like_exact_gathers_on_two_ranks(tmp_path, tiny_llama, synthetic_shards):
    exact = train(2, ds_json(tmp_path, qwz=False), tmp_path / "exact", synthetic_shards)
    assert exact.returncode == 0, (exact.stdout + exact.stderr)[-4000:]
    qwz = train(2, ds_json(tmp_path, qwz=True), tmp_path / "qwz", synthetic_shards)
    out = qwz.stdout + qwz.stderr
    assert qwz.returncode == 0, out[-4000:]
    # Each rank quantized what it sent (forward, recompute and backward gathers); the
    # exact run built no quantizer at all.
    assert len(quantized(out)) == 2 and all(calls > 0 for calls, _ in quantized(out)), out[-2000:]
    assert quantized(exact.stdout + exact.stderr) == [(0, 0), (0, 0)]
    # int8 per group of ~4k weights rounds each weight by at most 1/254 of its group's
    # largest; the losses move far less than that (measured 0.03%).
    got, want = losses(tmp_path / "qwz"), losses(tmp_path / "exact")
    assert len(got) == len(want) == 3
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert abs(g - w) <= 0.01 * abs(w), f"step {step}: loss {g} with qwZ, {w} with exact gathers"
    # What a step sends, against the planner: the third step's all-gathers (the counts
    # after step 3 less those after step 2, so start-up cancels) with exact gathers, and
    # with qwZ (int8 values and their fp32 scales, one per group of DeepSpeed's choice),
    # which the planner counts at one byte per weight, half of bf16. Each weight is
    # gathered once in the forward pass and once by the recompute, which serves the
    # backward too. (Before the decoder layer started its backward with the recompute,
    # ZeRO-3 gathered the frozen tower a third time: 2.2% above the planner here.)
    for name, qwz_on in (("exact", False), ("qwz", True)):
        gathered = step_gathers(tmp_path / f"{name}-out.json", step=3)
        planned = planned_gathers(tmp_path, shards=synthetic_shards, qwz=qwz_on)
        assert abs(planned - gathered) <= 0.01 * gathered, (name, planned, gathered)


@pytest.mark.slow
def test_qwz_fails_where_a_rank_share_is_not_a_multiple_of_8(tmp_path, tiny_llama, synthetic_shards):
    """The rule megafusion/plan/quantized.py states, against DeepSpeed itself: on three
    ranks the tiny model's shares are not multiples of 8 and DeepSpeed's quantizer
    asserts at the first gather; on two they are, and the run above trains."""
    from megafusion.config import load_config
    from megafusion.plan.quantized import qwz_misaligned
    from megafusion.plan.shapes import model_shape

    shape = model_shape(load_config(str(REPO / "configs/tiny.yaml"), []))
    assert qwz_misaligned(shape, 3, 0) and not qwz_misaligned(shape, 2, 0)
    res = train(3, ds_json(tmp_path, qwz=True), tmp_path / "three", synthetic_shards, steps=1)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "be a multiple of 8" in out, out[-4000:]


def test_preflight_refuses_qwz_on_a_world_size_it_would_fail_on(tmp_path, tiny_llama, synthetic_shards, capsys,
                                                                  monkeypatch):
    from megafusion.config import load_config
    from megafusion.parallel.preflight import preflight

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # the refusal is the model's and the world's, not the machine's
    cfg = load_config(str(REPO / "configs/tiny.yaml"), [f"parallel.ds_config={ds_json(tmp_path, qwz=True)}",
                                                        f"data.train={synthetic_shards}"])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        preflight(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "cannot run on 3 ranks" in err[0] and "; 2 ranks would do" in err[0] and "CUDA" not in err[0], err
    # On two ranks the shares are multiples of 8: only the machine's want of CUDA is left.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        preflight(cfg)
    err = capsys.readouterr().err
    assert "cannot run" not in err and "CUDA" in err, err
    # Ranks started by srun alone name their number in SLURM_NTASKS.
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    with pytest.raises(SystemExit):
        preflight(cfg)
    assert "cannot run on 3 ranks" in capsys.readouterr().err
