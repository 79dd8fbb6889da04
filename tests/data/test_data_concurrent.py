"""Two jobs building their datasets at the same moment on one machine both succeed: the
construction is serialized by a machine-wide lock (megafusion/data/shm.py), so they never
take the same streaming shared-memory prefix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mf_construct_worker.py")


@pytest.mark.slow
def test_two_jobs_build_at_once_repeatedly(tmp_path, synthetic_dir):
    sync = tmp_path / "sync"
    sync.mkdir()
    rounds = 3
    procs = []
    for job in ("a", "b"):
        out = tmp_path / f"{job}.json"
        log = open(tmp_path / f"{job}.log", "w")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        # Each its own job: its own cache root and run ids.
        cmd = [sys.executable, str(WORKER), synthetic_dir, str(tmp_path / f"cache-{job}"), job, str(sync), str(rounds),
               str(out)]
        procs.append((job, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out, log))
    results = {}
    try:
        for job, p, out, log in procs:
            p.wait(timeout=900)
            log.close()
            results[job] = json.loads(out.read_text()) if out.exists() else {"error": Path(log.name).read_text()[-3000:]}
    finally:
        for _, p, _, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for job, result in results.items():
        assert "error" not in result, f"job {job}: {result['error']}"
        assert len(result["prefixes"]) == rounds
    prefixes = results["a"]["prefixes"] + results["b"]["prefixes"]
    assert len(set(prefixes)) == 2 * rounds, results


KILLED_JOB = """
import sys
from megafusion.data import DataConfig, build_train_loader
from megafusion.data.dist_env import DistEnv
from megafusion.model.config import FusionConfig
from megafusion.model.loading import load_tokenizer
cfg = DataConfig(train=sys.argv[1], cache_root=sys.argv[2], run_id="requeued", seq_len=256, batch_size=1,
                 samples_per_step=2, num_workers=0)
loader = build_train_loader(cfg, FusionConfig(image_size=16), load_tokenizer("smollm2"), 64, DistEnv(0, 1, 0, 1))
print(loader.dataset._shm_prefix_int, flush=True)
sys.stdin.read()  # until killed (or the test is gone)
"""


@pytest.mark.slow
def test_a_killed_run_restarts_on_its_own_cache(tmp_path, synthetic_dir, tokenizer, fusion_cfg, make_cfg):
    """A run killed outright (no exit handlers) leaves its shared memory, which registers its
    cache directories. Once the /tmp file locks of that prefix are gone too (killed before
    its first step, as here, or a Slurm job's private /tmp), streaming refuses to reuse the
    directories ("Reused local directory"). The same run started again removes that record
    (it holds the node's cache lock, so the record can only be a dead job's) and builds."""
    import signal

    from mf_data_helpers import SINGLE, TOKENS_PER_IMAGE

    from megafusion.data import build_train_loader

    cache = tmp_path / "cache"
    repo = Path(__file__).resolve().parents[2]
    # Its own process group, killed whole: Python's resource tracker, which would unlink
    # the memory of a process killed alone, goes with it, as when a node's job is killed.
    p = subprocess.Popen([sys.executable, "-c", KILLED_JOB, synthetic_dir, str(cache)], cwd=repo,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        line = p.stdout.readline().strip()
        assert line.isdigit(), p.stderr.read()[-3000:] if p.poll() is not None else line
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    left = Path(f"/dev/shm/{int(line):06d}_locals")
    assert left.exists()  # the killed run's record stayed behind
    cfg = make_cfg(synthetic_dir, cache_root=str(cache), run_id="requeued", seq_len=256, batch_size=1,
                   samples_per_step=2)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    assert next(iter(loader)).num_samples == 2
    # The killed run's record is gone: unlinked, or replaced by this run's own (streaming
    # creates <prefix>_locals exclusively, so reusing the prefix proves the old one went).
    assert loader.dataset._shm_prefix_int == int(line) or not left.exists()


def test_every_streaming_dataset_is_built_inside_the_construction_window():
    """The lock only helps if every construction takes it: one StreamingDataset built
    outside it (a test's read-back, a tool's) races the training runs beside it for a
    prefix. CI failed once so, FileExistsError: '/000608_locals' in a test's read-back
    while another test's two-rank run built its loader. Each file that constructs one
    must use construction_window (the loader) or read shards without streaming's shared
    memory (megafusion/eval/rows.py)."""
    import re

    repo = Path(__file__).resolve().parents[2]
    call = re.compile(r"(?<![\w.])(StreamingDataset|FusionDataset)\(")  # a call, not a base class
    outside = []
    for path in sorted(p for d in ("megafusion", "tools", "tests") for p in (repo / d).rglob("*.py")):
        text = path.read_text()
        calls = [ln for ln in text.splitlines() if call.search(ln) and not ln.lstrip().startswith("class ")]
        if calls and "construction_window" not in text:
            outside.append(f"{path.relative_to(repo)}: {calls[0].strip()}")
    assert not outside, "StreamingDataset built outside shm.construction_window:\n" + "\n".join(outside)
