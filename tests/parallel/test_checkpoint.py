"""megafusion.parallel.checkpoint: durability of a save (fsync order, traced around a
real DeepSpeed engine) and what counts as a complete checkpoint (directories laid out
by hand, the expected survivors written out)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.parallel import checkpoint

REPO = Path(__file__).resolve().parents[2]


def make_tags(ckpt_dir: Path, steps, latest=None) -> None:
    for s in steps:
        (ckpt_dir / f"global_step{s}").mkdir(parents=True)
        (ckpt_dir / f"global_step{s}" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if latest is not None:
        (ckpt_dir / "latest").write_text(f"global_step{latest}")


def tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir()), key=lambda n: int(n.removeprefix("global_step")))


def test_torn_directory_is_not_counted_towards_keep_last(tmp_path):
    """5 and 10 complete (latest=10), 15 torn by a crash mid-save. A save of 12 (the
    rerun checkpointing on another schedule) with keep_last=2 keeps the two newest
    complete ones, 10 and 12, and drops the torn 15."""
    make_tags(tmp_path, [5, 10, 12, 15], latest=12)
    checkpoint._prune(tmp_path, keep_last=2, keep="global_step12")
    assert tags(tmp_path) == ["global_step10", "global_step12"]


def test_prune_keeps_all_complete_with_keep_last_zero(tmp_path):
    make_tags(tmp_path, [5, 10, 15], latest=10)
    checkpoint._prune(tmp_path, keep_last=0, keep="global_step10")
    assert tags(tmp_path) == ["global_step5", "global_step10"]


@pytest.mark.parametrize("steps,latest,survivors", [
    ([5, 10, 15], 10, [5, 10]),      # every rank killed while writing 15
    ([5, 10], 10, [5, 10]),          # nothing torn
    ([5], None, []),                 # killed during the very first save: no latest yet
    ([5, 10], 20, [5, 10]),          # latest names a missing directory: touch nothing
])
def test_remove_torn(tmp_path, steps, latest, survivors):
    make_tags(tmp_path, steps, latest=latest)
    removed = checkpoint.remove_torn(tmp_path)
    assert tags(tmp_path) == [f"global_step{s}" for s in survivors]
    assert sorted(removed) == sorted(f"global_step{s}" for s in set(steps) - set(survivors))


@pytest.mark.slow
def test_save_fsyncs_files_and_directories_around_moving_latest(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, str(REPO / "tests/parallel/checkpoint_fsync_worker.py"), str(ckpt_dir)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    events = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("EVENTS "))[len("EVENTS "):])
    latest = str(ckpt_dir / "latest")
    moves = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == latest]
    assert len(moves) == 1, events
    before, after = events[:moves[0]], events[moves[0] + 1:]
    synced_before = {e[1] for e in before if e[0] == "fsync"}
    for e in before:  # a file synced under a temporary name, then renamed into place
        if e[0] == "replace" and e[1] in synced_before:
            synced_before.add(e[2])
    tag_dir = ckpt_dir / "global_step1"
    files = {str(p) for p in tag_dir.rglob("*") if p.is_file()}
    assert any("model_states" in f for f in files) and any("optim_states" in f for f in files), files
    assert files <= synced_before, f"not fsynced before latest moved: {sorted(files - synced_before)}"
    assert str(tag_dir) in synced_before, "the tag directory's entries must be synced before latest moves"
    src = events[moves[0]][1]
    assert src in synced_before, "the new latest's contents must be synced before the rename"
    assert ["fsync", str(ckpt_dir)] in after, "the checkpoints directory must be synced after the rename"
    assert (ckpt_dir / "latest").read_text() == "global_step1"
