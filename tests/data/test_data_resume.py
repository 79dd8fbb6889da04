"""Exact resume: batches after restoring the loader state at step k equal those of the
uninterrupted run, carried documents included. On one rank in-process; on two ranks each
phase runs two fresh processes, as after a restart."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchers import rank_env

from megafusion.parallel.launch import free_port

WORKER = Path(__file__).with_name("mf_resume_worker.py")
WORLD = 2


def run_ranks(tmp_path, tag, args, launcher="torchrun"):
    port = free_port()
    procs = []
    try:
        for rank in range(WORLD):
            env = rank_env(rank, WORLD, port, TOKENIZERS_PARALLELISM="false")
            if launcher == "deepspeed":  # it exports LOCAL_SIZE, not LOCAL_WORLD_SIZE: init_dist_env fills it in
                env["LOCAL_SIZE"] = env.pop("LOCAL_WORLD_SIZE")
            out = tmp_path / f"{tag}-rank{rank}.pt"
            log = open(tmp_path / f"{tag}-rank{rank}.log", "w")  # files, not pipes: a full pipe would block a rank
            procs.append((subprocess.Popen([sys.executable, str(WORKER), *args[:3], str(out), *args[3:]], env=env,
                                           stdout=log, stderr=subprocess.STDOUT), out, log))
        results = []
        for p, out, log in procs:
            p.wait(timeout=200)
            log.close()
            text = Path(log.name).read_text()
            assert p.returncode == 0, f"{tag} rank failed:\n{text[-3000:]}"
            results.append(torch.load(out, weights_only=False))
        return results
    finally:
        for p, _, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_resume_with_a_carry_is_exact(tokenizer, synthetic_dir, tmp_path, fusion_cfg, make_cfg):
    """Long text mixed with images: at step k the carry holds text tails (offsets > 0); a
    fresh loader given the state packs the remaining steps exactly as the uninterrupted one."""
    from itertools import islice

    from mf_data_helpers import SINGLE, TOKENS_PER_IMAGE
    from test_data_mixing import write_long_text

    from megafusion.data import build_train_loader

    streams = [{"remote": synthetic_dir, "proportion": 0.7}, {"remote": write_long_text(tmp_path), "proportion": 0.3}]
    kw = dict(seq_len=256, batch_size=2, epoch_size=1000)
    full = build_train_loader(make_cfg(streams, **kw), fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    it = iter(full)
    for k in range(1, 30):  # the first step after which a text tail waits
        per_step = next(it).num_samples
        state = full.state_dict()
        if any(offset > 0 for *_, offset in state["carry"]):
            break
    assert any(offset > 0 for *_, offset in state["carry"])
    assert state["sample_in_epoch"] == k * per_step
    tail = list(islice(it, 4))

    resumed = build_train_loader(make_cfg(streams, **kw), fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    resumed.load_state_dict(state)
    again = list(islice(resumed, 4))
    assert len(again) == 4
    for a, b in zip(tail, again):
        assert_same_batch({**a.as_dict(), "stats": a.stats}, {**b.as_dict(), "stats": b.stats})


@pytest.mark.slow
def test_resume_two_ranks_is_exact(tmp_path, synthetic_dir):
    """Run A: 6 steps uninterrupted (torchrun-style env, 2 loader workers), each rank's loader
    state saved after step 2 as a checkpoint would. Run B: fresh processes (deepspeed-
    launcher env: LOCAL_SIZE only; 1 worker) load those states and run the last 4 steps."""
    steps, k = 6, 2
    common = [synthetic_dir, str(tmp_path / "cache"), "resume"]
    state = tmp_path / "state.pt"
    full = run_ranks(tmp_path, "full", common + ["--steps", str(steps), "--num-workers", "2",
                                                 "--save-after", str(k), str(state)])
    rest = run_ranks(tmp_path, "rest", common + ["--steps", str(steps - k), "--load", str(state),
                                                 "--num-workers", "1"], launcher="deepspeed")
    saved = torch.load(f"{state}.rank0")
    assert saved["sample_in_epoch"] == k * 5 * WORLD
    assert any(torch.load(f"{state}.rank{r}")["carry"] for r in range(WORLD))  # resumed with a carry
    for rank in range(WORLD):
        assert full[rank]["env"] == rest[rank]["env"] == (rank, WORLD, rank, WORLD)
        fb, rb = full[rank]["batches"], rest[rank]["batches"]
        assert len(fb) == steps and len(rb) == steps - k
        for a, b in zip(fb[k:], rb):
            assert_same_batch(a, b)
    # The ranks saw different data, and the resumed run did not restart the epoch.
    assert not torch.equal(full[0]["batches"][0]["input_ids"], full[1]["batches"][0]["input_ids"])
    assert not torch.equal(full[0]["batches"][0]["input_ids"], rest[0]["batches"][0]["input_ids"])
