"""megafusion.parallel.checkpoint: durability of a save (fsync order, traced around a
real DeepSpeed engine) and what counts as a complete checkpoint (directories laid out
by hand, the expected survivors written out)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    checkpoint._prune(tmp_path, keep_last=2, keep="global_step12", previous=10)
    assert tags(tmp_path) == ["global_step10", "global_step12"]


def test_prune_keeps_all_complete_with_keep_last_zero(tmp_path):
    make_tags(tmp_path, [5, 10, 15], latest=10)
    checkpoint._prune(tmp_path, keep_last=0, keep="global_step10", previous=10)
    assert tags(tmp_path) == ["global_step5", "global_step10"]


class FakeEngine:
    """What checkpoint.save() uses of a DeepSpeed engine: save_checkpoint writes the tag
    directory's model file; module names the trainable parameters."""

    def __init__(self):
        import torch

        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")


def complete_tags(ckpt_dir: Path, steps, latest, world: int = 1, written: int | None = None) -> None:
    """Checkpoints as a finished save leaves them: DeepSpeed's file, each rank's client
    file, which records the number of ranks (written < world: a save torn before the
    last ranks wrote theirs)."""
    make_tags(ckpt_dir, steps, latest=latest)
    for s in steps:
        for rank in range(world if written is None else written):
            torch.save({"step": s, "world_size": world}, checkpoint.client_path(ckpt_dir, f"global_step{s}", rank))


def test_a_save_at_a_lower_step_keeps_the_newer_complete_checkpoints(tmp_path):
    """A run that starts again from step 0 in a directory holding 1000-3000 (what
    run.resume=never did, and a `latest` naming a deleted tag): its first save moved
    `latest` to 100 and then removed 1000, 2000 and 3000 as "torn" (newer than latest).
    A save removes only what is newer than the `latest` it replaces (4000 here, a save
    every rank died in)."""
    ckpt = tmp_path / "checkpoints"
    complete_tags(ckpt, [1000, 2000, 3000], latest=3000)
    make_tags(ckpt, [4000])
    checkpoint.save(FakeEngine(), ckpt, 100, {"loader": None}, keep_last=3)
    assert tags(ckpt) == ["global_step100", "global_step1000", "global_step2000", "global_step3000"]
    for s in (1000, 2000, 3000):
        assert torch.load(checkpoint.client_path(ckpt, f"global_step{s}", 0))["step"] == s
    assert (ckpt / "latest").read_text() == "global_step100"


def test_a_save_after_the_newest_prunes_as_before(tmp_path):
    """The ordinary case: torn leftovers newer than the old `latest` go, keep_last counts
    complete ones only."""
    ckpt = tmp_path / "checkpoints"
    complete_tags(ckpt, [5, 10], latest=10)
    make_tags(ckpt, [15])  # torn: newer than latest=10
    checkpoint.save(FakeEngine(), ckpt, 12, {"loader": None}, keep_last=2)
    assert tags(ckpt) == ["global_step10", "global_step12"]
    ckpt2 = tmp_path / "first"
    make_tags(ckpt2, [3, 7])  # no latest at all: every directory is a torn first save
    checkpoint.save(FakeEngine(), ckpt2, 5, {"loader": None}, keep_last=0)
    assert tags(ckpt2) == ["global_step3", "global_step5"]


@pytest.mark.parametrize("latest, make, words", [
    ("global_step3000", None, ["names global_step3000", "does not exist", "global_step1000, global_step2000"]),
    ("global_step2000", "no_client", ["names global_step2000", "megafusion_client_rank00000.pt"]),
    ("oops\nmore", None, ["'oops\\nmore'", "not a global_step<N> tag"]),
])
def test_latest_naming_nothing_loadable_is_an_error_not_a_fresh_start(tmp_path, latest, make, words):
    """load_latest returned None for a `latest` naming a missing directory: the trainer
    started at step 0 and its first save pruned the run."""
    ckpt = tmp_path / "checkpoints"
    complete_tags(ckpt, [1000], latest=None)
    if make == "no_client":
        make_tags(ckpt, [2000])
    else:
        complete_tags(ckpt, [2000], latest=None)
    (ckpt / "latest").write_text(latest)
    for call in (lambda: checkpoint.load_latest(None, ckpt, 1), lambda: checkpoint.check_resume(ckpt, "auto")):
        with pytest.raises(SystemExit) as exc:
            call()
        message = str(exc.value)
        assert message.startswith("error: ") and "\n" not in message, message
        assert str(ckpt / "latest") in message and all(w in message for w in words), message
    assert tags(ckpt) == ["global_step1000", "global_step2000"]  # nothing removed


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    checkpoint.check_resume(ckpt, "never")  # no directory: a fresh start
    make_tags(ckpt, [5])  # a first save every rank died in (no latest): nothing to keep
    checkpoint.check_resume(ckpt, "never")
    checkpoint.check_resume(ckpt, "auto")
    assert checkpoint.latest_tag(ckpt) is None
    complete_tags(ckpt, [10], latest=10)
    with pytest.raises(SystemExit) as exc:
        checkpoint.check_resume(ckpt, "never")
    message = str(exc.value)
    assert message.startswith("error: run.resume=never") and "global_step10" in message and "\n" not in message
    checkpoint.check_resume(ckpt, "auto")
    assert checkpoint.latest_tag(ckpt) == "global_step10"


def test_a_missing_latest_beside_complete_checkpoints_is_an_error_not_a_fresh_start(tmp_path):
    """`latest` removed by hand: the start-up cleanup took every tag directory for a
    first save that every rank died in, removed them all and trained from step 0. Now
    a complete checkpoint (every rank's client file) is refused in one line and kept; a
    save torn before its last ranks wrote theirs is still removed."""
    ckpt = tmp_path / "checkpoints"
    complete_tags(ckpt, [100, 200], latest=None, world=2)
    complete_tags(ckpt, [300], latest=None, world=2, written=1)  # rank 1 died mid-save
    make_tags(ckpt, [400])  # every rank died before its client file
    for call in (lambda: checkpoint.load_latest(None, ckpt, 2), lambda: checkpoint.check_resume(ckpt, "auto"),
                 lambda: checkpoint.latest_tag(ckpt)):
        with pytest.raises(SystemExit) as exc:
            call()
        message = str(exc.value)
        assert message.startswith("error: ") and "\n" not in message, message
        assert "no latest file" in message and "the newest global_step200" in message, message
    assert tags(ckpt) == ["global_step100", "global_step200"]  # the torn 300 and 400 went
    # The first save that every rank died in, alone: removed and a fresh start, as before.
    first = tmp_path / "first"
    complete_tags(first, [5], latest=None, world=2, written=1)
    assert checkpoint.load_latest(None, first, 2) is None and tags(first) == []


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
