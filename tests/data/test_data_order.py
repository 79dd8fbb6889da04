"""The samples a run sees do not depend on how many nodes and ranks read them
(data.num_canonical_nodes is fixed in the config instead of streaming's default, the node
count of the first run), so a run restarted or resumed on another number of ranks sees the
same samples: at every whole global batch, the same set as on one rank."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchers import rank_env
from mf_data_helpers import SINGLE, TOKENS_PER_IMAGE

from megafusion.parallel.launch import free_port

from megafusion.data import build_train_loader

WORKER = Path(__file__).with_name("mf_order_worker.py")


def global_order(dataset, num_nodes: int, ranks_per_node: int, configured_ncn, configured_block) -> list[int]:
    """The epoch's samples in training order on that many nodes and ranks (one loader
    worker each): streaming's own partition, its canonical nodes resolved as the dataset
    resolves them when a run starts; global step s is rank 0's s-th batch, then rank 1's..."""
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    world = World(num_nodes, ranks_per_node, 1, 0)
    dataset.num_canonical_nodes, dataset.shuffle_block_size = configured_ncn, configured_block
    dataset._resume(world, 0)  # nothing to resume: fills in streaming's defaults for this world
    work = generate_work(dataset.batching_method, dataset, world, 0, 0)  # [node, rank, worker, batch, sample]
    return [int(i) for s in range(work.shape[3]) for n in range(num_nodes) for r in range(ranks_per_node)
            for i in work[n, r, 0, s]]


def test_sample_sets_match_across_node_and_rank_counts(tokenizer, synthetic_dir, fusion_cfg, make_cfg):
    loader = build_train_loader(make_cfg(synthetic_dir, seq_len=256, batch_size=1, samples_per_step=4),
                                fusion_cfg, tokenizer, TOKENS_PER_IMAGE, SINGLE)
    ds = loader.dataset
    configured = (ds.num_canonical_nodes, ds.shuffle_block_size)
    one = global_order(ds, 1, 1, *configured)
    for nodes, ranks in ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2)):
        other = global_order(ds, nodes, ranks, *configured)
        step = 4 * nodes * ranks  # one global batch
        for k in range(step, 25 * step, step):
            assert set(other[:k]) == set(one[:k]), (nodes, ranks, k)


def run_ranks(tmp_path, tag, world, local_world, data, steps, simulated_nodes=False):
    port = free_port()
    procs = []
    for rank in range(world):
        env = rank_env(rank, world, port, local_world, TOKENIZERS_PARALLELISM="false")
        out = tmp_path / f"{tag}-rank{rank}.pt"
        log = open(tmp_path / f"{tag}-rank{rank}.log", "w")
        args = [sys.executable, str(WORKER), data, str(tmp_path / f"cache-{tag}"), tag, str(out), "--steps", str(steps)]
        procs.append((subprocess.Popen(args + (["--simulated-node"] if simulated_nodes else []), env=env, stdout=log,
                                       stderr=subprocess.STDOUT), out, log))
    return procs


def collect(procs):
    results = []
    try:
        for p, out, log in procs:
            p.wait(timeout=900)
            log.close()
            assert p.returncode == 0, Path(log.name).read_text()[-3000:]
            results.append(torch.load(out))
    finally:
        for p, _, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    steps = zip(*(r["steps"] for r in results))  # global step s: rank 0's s-th batch, then rank 1's...
    return [i for step in steps for batch in step for i in batch]


@pytest.mark.slow
def test_loader_sees_the_same_samples_on_one_and_two_ranks(tmp_path, synthetic_dir):
    """End to end through the loader, each rank its own process: one rank for 12 steps;
    two ranks on one node, and two nodes of one rank (simulated on this machine), for 6."""
    runs = {"one": run_ranks(tmp_path, "one", 1, 1, synthetic_dir, 12),
            "ranks": run_ranks(tmp_path, "ranks", 2, 2, synthetic_dir, 6),
            "nodes": run_ranks(tmp_path, "nodes", 2, 1, synthetic_dir, 6, simulated_nodes=True)}
    order = {name: collect(procs) for name, procs in runs.items()}
    assert len(order["one"]) == len(order["ranks"]) == len(order["nodes"]) == 48
    for k in range(8, 49, 8):
        assert set(order["ranks"][:k]) == set(order["one"][:k]), k
        assert set(order["nodes"][:k]) == set(order["one"][:k]), k
