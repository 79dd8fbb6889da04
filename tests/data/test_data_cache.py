"""The node cache: bounded by data.cache_limit, and the directories of finished jobs
removed at start-up, never those of the current or of a concurrently running job."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
from mf_data_helpers import IMAGE_SIZE, SINGLE, TOKENS_PER_IMAGE

from megafusion.data import build_train_loader
from megafusion.data.prepare import write_synthetic

REPO = Path(__file__).resolve().parents[2]

# One simulated job: claims its node cache (as the local leader does at start-up), puts a
# file in it, prints what it removed, and lives until its stdin is closed.
JOB = """
import sys
from pathlib import Path
from megafusion.data.cache import claim_node_cache
root, run_id = sys.argv[1], sys.argv[2]
try:
    removed = claim_node_cache(root, run_id, 0)
except ValueError as e:
    print("refused", e, flush=True)
    sys.exit(3)
(Path(root) / run_id / "node0" / "train-0").mkdir(parents=True, exist_ok=True)
(Path(root) / run_id / "node0" / "train-0" / "shard.00000.mds").write_bytes(b"x" * 100)
print("removed", sorted(Path(p).parent.name for p in removed), flush=True)
sys.stdin.read()
"""


class Job:
    def __init__(self, root, run_id):
        self.proc = subprocess.Popen([sys.executable, "-c", JOB, str(root), run_id], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.first_line = self.proc.stdout.readline().strip()

    @property
    def removed(self):
        assert self.first_line.startswith("removed "), self.first_line + self.proc.stderr.read()
        return eval(self.first_line[len("removed "):])

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_stale_cache_directories_of_earlier_jobs_are_removed(tmp_path):
    root = tmp_path / "cache"
    (root / "legacy" / "node0").mkdir(parents=True)  # an older megafusion's: no lock file
    (root / "elsewhere" / "node0").mkdir(parents=True)  # another host's, on a shared filesystem
    (root / "elsewhere" / "node0.lock").write_text("some-other-host 12345\n")
    assert socket.gethostname() != "some-other-host"

    earlier = Job(root, "earlier")
    assert earlier.removed == []
    earlier.stop()  # finished: its directory stays behind until the next job starts
    running = Job(root, "running")
    assert running.removed == ["earlier"]
    assert not (root / "earlier").exists()

    # A second job while `running` lives: it removes nothing of it.
    second = Job(root, "second")
    assert second.removed == []
    assert (root / "running" / "node0" / "train-0" / "shard.00000.mds").is_file()
    # The same run started again while it lives is refused, not given the same directory.
    twin = Job(root, "running")
    assert twin.first_line.startswith("refused") and "data.run_id" in twin.first_line
    assert twin.proc.wait(timeout=30) == 3

    running.stop()
    second.stop()
    # A requeued run finds its own directory (the current job's is never removed) and
    # removes the other finished one.
    requeued = Job(root, "running")
    assert requeued.removed == ["second"]
    assert (root / "running" / "node0" / "train-0" / "shard.00000.mds").is_file()
    requeued.stop()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["elsewhere", "legacy", "running"]


def test_loader_claims_its_cache_and_removes_stale_ones(tokenizer, synthetic_dir, tmp_path, fusion_cfg, make_cfg):
    root = tmp_path / "cache"
    Job(root, "finished").stop()
    assert (root / "finished" / "node0").is_dir()
    cfg = make_cfg(synthetic_dir, cache_root=str(root), run_id="live", seq_len=256, batch_size=1)
    loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    next(iter(loader))
    assert not (root / "finished").exists()
    lock = root / "live" / "node0.lock"
    assert lock.read_text().split() == [socket.gethostname(), str(os.getpid())]
    # Held for the life of this process: a job starting now leaves it alone.
    assert Job(root, "next").removed == []
    assert (root / "live" / "node0").is_dir()


def test_cache_limit_defaults_and_reaches_streaming(tokenizer, synthetic_dir, fusion_cfg, make_cfg):
    loader = build_train_loader(make_cfg(synthetic_dir), fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    assert loader.dataset.cache_limit == 100 * 2**30  # "100gb"
    with pytest.raises(ValueError, match="data.cache_limit"):
        build_train_loader(make_cfg(synthetic_dir, cache_limit="1kb"), fusion_cfg, tokenizer, TOKENS_PER_IMAGE,
                           SINGLE)
    with pytest.raises(ValueError, match="data.cache_limit"):
        make_cfg(synthetic_dir, cache_limit="lots").validate()


def disk_usage(path: Path) -> int:
    """Bytes of the files under path. streaming deletes a shard's compressed file once it
    is decompressed, possibly between the listing and the stat: such a file counts 0."""
    total = 0
    for f in path.rglob("*"):
        try:
            if f.is_file():
                total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_cache_stays_within_its_limit(tokenizer, tmp_path, fusion_cfg, make_cfg):
    """An epoch over 12 shards with room for 4: the node's cache directory, measured on disk
    after every step, stays within the limit (give or take the one shard streaming may be
    downloading beside another: it reserves no room for downloads in flight); without a
    limit it ends holding every shard."""
    import json

    shards = tmp_path / "shards"
    write_synthetic(str(shards), 200, IMAGE_SIZE, seed=3, shard_size=1 << 13)
    index = json.loads((shards / "index.json").read_text())
    assert len(index["shards"]) >= 10
    biggest = max(s["raw_data"]["bytes"] + s["zip_data"]["bytes"] for s in index["shards"])
    everything = sum(s["raw_data"]["bytes"] for s in index["shards"])
    limit = 4 * biggest + (shards / "index.json").stat().st_size + 1
    assert limit < everything

    peaks = {}
    for name, cache_limit in (("bounded", limit), ("unbounded", None)):
        cfg = make_cfg(str(shards), cache_root=str(tmp_path / name), run_id=name, cache_limit=cache_limit,
                       seq_len=512, batch_size=1, samples_per_step=8)
        loader = build_train_loader(cfg, fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
        node = tmp_path / name / name / "node0"
        sizes = [disk_usage(node) for _ in islice(loader, 10_000)]
        assert len(sizes) * 8 >= 200  # the whole epoch
        peaks[name] = max(sizes)
    assert peaks["bounded"] <= limit + biggest
    assert peaks["unbounded"] >= everything > limit + biggest
