"""ZeRO++'s hierarchical partitioning (hpZ) on four CPU ranks taken as two nodes of two:
DeepSpeed's own run against a plain ZeRO-3 run (the losses) and against the planner
(what a step gathers across nodes and inside one, and the second copy of the shards).
The settings are the large configs' (bf16, zero_init, activation checkpointing), with
ZeRO-3 buckets smaller than the model so that the backward pass gathers again."""
import json

import pytest
from test_plan import TINY, run_worker, small_buckets

from megafusion.config import load_config
from megafusion.plan.choose import configured_setting, evaluate
from megafusion.plan.hardware import gpu
from megafusion.plan.shapes import model_shape

RANKS, PER_NODE, GA = 4, 2, 2
SETTINGS = ["parallel.zero_init=true", "model.activation_checkpointing=true", f"train.gradient_accumulation={GA}"]


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_gathers(run: dict, step: int) -> dict[int, int]:
    """Bytes this rank put into all-gathers during optimizer step `step`, by the size of
    the group they ran over (the counts after the step less those before it)."""
    after, before = run["gathers_by_group"][step - 1], run["gathers_by_group"][step - 2]
    return {int(size): n - before.get(size, 0) for size, n in after.items() if n - before.get(size, 0)}


@pytest.mark.slow
def test_hpz_trains_like_zero3_and_gathers_as_planned_on_four_ranks(tmp_path, tiny_llama, synthetic_shards):
    """With zero_hpz_partition_size 2, start-up no longer fails (each zero.Init of
    start-up created DeepSpeed's node-local group anew, which asserts), the losses equal
    plain ZeRO-3's (the node-local copy holds the same bf16 weights), and the second
    step's gathers and the copy's bytes equal the planner's at 2 GPUs per node within
    1%: across the four ranks only the trainable weights, once (DeepSpeed drops their
    copy after each optimizer step; the frozen tower's is never dropped), and inside
    the pair every other gather of the step's two micro-batches, forward and backward."""
    buckets_ds, buckets = small_buckets()
    data = [f"data.train={synthetic_shards}", "train.steps=2", "log.every=1", *SETTINGS]
    plain = run_worker(tmp_path, "plain", data, buckets_ds, ranks=RANKS)
    hpz = run_worker(tmp_path, "hpz", data, {**buckets_ds, "zero_hpz_partition_size": PER_NODE}, ranks=RANKS)

    got, want = losses(tmp_path / "hpz"), losses(tmp_path / "plain")
    assert len(got) == len(want) == 2
    assert all(abs(g - w) <= 1e-6 * abs(w) for g, w in zip(got, want)), (got, want)

    cfg = load_config(TINY, [*data, "train.dtype=bf16"])
    shape = model_shape(cfg)

    def planned(hpz_size: int):
        s = configured_setting(cfg, RANKS).with_(persistence=0, hpz=hpz_size, **buckets)
        return evaluate(shape, s, RANKS, PER_NODE, gpu("h100-80gb"), seq_len=cfg.data.seq_len, caption_tokens=32,
                        efficiency=0.5, frozen_text=True)

    # An all-gather's input is this rank's shard, which each of the group's other ranks receives.
    received = lambda by_group: {size: n * (size - 1) for size, n in by_group.items()}
    kinds = {t.kind: t.bytes for t in planned(PER_NODE).step.traffic}
    measured = received(step_gathers(hpz, step=2))
    assert set(measured) == {RANKS, PER_NODE}, measured
    for kind, size in (("weight all-gather (trainable, once per step)", RANKS),
                       ("weight all-gather (hpZ, inside the node)", PER_NODE)):
        assert abs(kinds[kind] - measured[size]) <= 0.01 * measured[size], (kind, kinds[kind], measured[size])
    # Plain ZeRO-3 gathers everything over all four ranks, forward and backward.
    plain_kinds = {t.kind: t.bytes for t in planned(1).step.traffic}
    plain_measured = received(step_gathers(plain, step=2))
    assert set(plain_measured) == {RANKS}, plain_measured
    planned_plain = plain_kinds["weight all-gather (forward)"] + plain_kinds["weight all-gather (backward)"]
    assert abs(planned_plain - plain_measured[RANKS]) <= 0.01 * plain_measured[RANKS]
    assert measured[RANKS] < 0.05 * plain_measured[RANKS]  # what hpZ is for

    # The second copy as each step ends (before DeepSpeed drops the trainable part).
    copy = planned(PER_NODE).memory["hpZ secondary shards"]
    assert len(hpz["secondary_at_step"]) >= 2 and not plain["secondary_at_step"][0]
    for held in hpz["secondary_at_step"][:2]:
        assert abs(copy - held) <= 0.01 * held, (copy, held)


def test_preflight_refuses_an_hpz_group_that_does_not_divide_the_ranks(tmp_path, tiny_llama, synthetic_shards,
                                                                      capsys, monkeypatch):
    """DeepSpeed asserts at start-up (groups._ensure_divisibility) when the hpZ group size
    does not divide the world size: refused in one line before the base loads."""
    from megafusion.parallel.preflight import preflight

    ds = json.loads((TINY.parent.parent / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["zero_hpz_partition_size"] = 2
    path = tmp_path / "hpz.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(TINY, [f"parallel.ds_config={path}", f"data.train={synthetic_shards}"])
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exc:
        preflight(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "does not divide the 3 ranks" in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "4")  # hpZ itself runs on CPU ranks (the test above)
    preflight(cfg)
