"""FusionDataset's ready thread (streaming's, with one change) against a shard that is
evicted while the thread waits for it: the download thread finished it and, under a tight
data.cache_limit, evicted it again before the ready thread's next poll. streaming 0.13's
own thread then waits for ever (it re-prepares a shard only before it starts waiting);
this one prepares it again and goes on. A stand-in dataset drives the thread through
exactly that order of events."""
import threading
import time
import types

from streaming import StreamingDataset
from streaming.base.dataset import _ShardState

from megafusion.data.dataset import FusionDataset


class Iteration:
    """streaming's per-epoch _Iterator, as much of it as the ready thread reads."""

    def __init__(self, sample_ids):
        self.sample_ids, self.total = sample_ids, len(sample_ids)
        self.ready_index = self.yield_index = 0
        self.exited = False

    def should_exit(self) -> bool:
        return False

    def on_exit(self) -> None:
        self.exited = True


def evicted_while_waiting(ready_thread) -> tuple[bool, Iteration, list[int]]:
    """Run `ready_thread` on two samples of shard 0 while the download thread is preparing
    shard 0; after the thread has started waiting, the shard turns REMOTE (downloaded, then
    evicted, within one poll). Returns whether the thread finished within 5 s, the
    iteration and the shards it prepared."""
    states = [_ShardState.PREPARING]
    prepared = []

    def prepare_shard(shard_id, blocking=True):
        prepared.append(shard_id)
        states[shard_id] = _ShardState.LOCAL

    dataset = types.SimpleNamespace(predownload=None, _event=threading.Event(), spanner={0: (0, 0), 1: (0, 1)},
                                    _shard_states=states, prepare_shard=prepare_shard)
    it = Iteration([0, 1])
    thread = threading.Thread(target=ready_thread, args=(dataset, it), daemon=True)
    thread.start()
    time.sleep(0.3)  # several polls: the thread is waiting for the download
    states[0] = _ShardState.REMOTE
    thread.join(5)
    finished = not thread.is_alive()
    dataset._event.set()  # lets a stuck thread end
    thread.join(5)
    return finished, it, prepared


def test_a_shard_evicted_while_waited_for_is_prepared_again():
    finished, it, prepared = evicted_while_waiting(FusionDataset._ready_thread)
    assert finished and it.exited and it.ready_index == 2, (finished, it.ready_index)
    assert prepared == [0]


def test_streamings_own_ready_thread_still_waits_for_ever():
    """Why the override exists; when a streaming release fixes this, this test fails and
    FusionDataset._ready_thread can go."""
    finished, it, prepared = evicted_while_waiting(StreamingDataset._ready_thread)
    assert not finished and prepared == []
