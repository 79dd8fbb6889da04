"""Every rank SIGKILLed while a checkpoint is being written (two ranks, ZeRO-3, the real
trainer). The save is held open by the MEGAFUSION_TEST_HOLD_SAVE hook after DeepSpeed
has written its files and before the ranks' client files and `latest`: the directory is
torn. Reference: an uninterrupted run of the same configuration."""
import time

import pytest
from launchers import kill_job

from test_train import by_step, launch, metrics, run

pytestmark = pytest.mark.slow

STEPS, EVERY, TORN = 12, 4, 8
EXTRA = (f"checkpoint.every={EVERY}", "checkpoint.keep_last=2")


def wait_for_files(paths, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if all(p.exists() for p in paths):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the save was held:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{[str(p) for p in paths]} not all there after {timeout}s")


def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path, tiny_llama, synthetic_shards):
    ref_dir, run_dir, hold = tmp_path / "ref", tmp_path / "run", tmp_path / "hold"
    hold.mkdir()
    code, out = run(ref_dir, synthetic_shards, STEPS, *EXTRA)
    assert code == 0, out[-4000:]
    ref = by_step(metrics(ref_dir))

    p = launch(run_dir, synthetic_shards, STEPS, *EXTRA, env={"MEGAFUSION_TEST_HOLD_SAVE": f"{TORN}:{hold}"})
    wait_for_files([hold / "held.rank0", hold / "held.rank1"], p)
    kill_job(p)  # every rank, mid-save
    ckpt = run_dir / "checkpoints"
    torn = ckpt / f"global_step{TORN}"
    assert any(torn.glob("*model_states.pt")), "the hook should hold the save after DeepSpeed's files"
    assert not any(torn.glob("megafusion_client_rank*.pt"))
    assert (ckpt / "latest").read_text() == f"global_step{TORN - EVERY}"

    code, out = run(run_dir, synthetic_shards, STEPS, *EXTRA)
    assert code == 0, out[-4000:]
    assert f"removed incomplete checkpoint {torn}" in out, out[-3000:]
    assert f"resumed from {ckpt / f'global_step{TORN - EVERY}'} at step {TORN - EVERY}" in out
    rows = metrics(run_dir)
    redone = [r for r in rows if r["step"] > TORN - EVERY][-(STEPS - TORN + EVERY):]
    assert [r["step"] for r in redone] == list(range(TORN - EVERY + 1, STEPS + 1))
    for r in redone:
        for k in ("loss", "lm_loss", "diffusion_loss"):
            assert r[k] == ref[r["step"]][k], (r["step"], k, r[k], ref[r["step"]][k])
    # keep_last=2 of complete checkpoints; the rewritten step-8 directory is whole.
    assert {d.name for d in ckpt.iterdir() if d.is_dir()} == {f"global_step{TORN}", f"global_step{STEPS}"}
    assert len(list(torn.glob("megafusion_client_rank*.pt"))) == 2
