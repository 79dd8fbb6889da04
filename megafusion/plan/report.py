"""The planner's table (what tools/plan.py prints) and its JSON form."""
from __future__ import annotations

import dataclasses

from megafusion.plan.choose import Estimate
from megafusion.plan.shapes import ModelShape

GB = 1e9


def ds_settings(e: Estimate) -> dict:
    """The DeepSpeed and run-config keys that select this setting."""
    s = e.setting
    run = {"parallel.zero_stage": s.zero_stage, "parallel.pipeline_stages": s.pipeline_stages,
           "train.micro_batch_size": s.micro_batch, "train.gradient_accumulation": s.grad_accum,
           "model.activation_checkpointing": s.checkpointing}
    dtype = {4: "fp32", 2: "bf16"}
    ds = {"communication_data_type": dtype[s.grad_comm_bytes]}
    z = {"reduce_bucket_size": s.reduce_bucket}
    if s.zero_stage == 3:
        z.update(stage3_prefetch_bucket_size=s.prefetch_bucket, stage3_max_live_parameters=s.max_live,
                 stage3_max_reuse_distance=s.max_reuse,
                 stage3_param_persistence_threshold=s.persistence, sub_group_size=s.sub_group)
        if s.quantized_weights:
            z["zero_quantized_weights"] = True
        if s.hpz > 1:
            z["zero_hpz_partition_size"] = s.hpz
        ds["data_types"] = {"grad_accum_dtype": dtype[s.grad_accum_bytes]}
    ds["zero_optimization"] = z
    return {"run_config": run, "deepspeed": ds}


def _row(e: Estimate, usable: float) -> str:
    s, m = e.setting, e.memory
    fits = "fails" if e.cannot_run else "fits" if e.fits else "OOM"
    return (f"{e.name:<34} {s.micro_batch:>3} x {s.grad_accum:<4} {m['total'] / GB:7.1f} {fits:<5}"
            f"{sum(t.bytes for t in e.step.traffic) / GB:9.1f} {e.step.compute_s:8.2f} {e.step.comm_s:8.2f}"
            f" {e.step.step_s:8.2f} {100 * e.step.mfu:6.1f}% {e.step.tokens_per_s_per_gpu:8.0f}")


def _breakdown(e: Estimate) -> list[str]:
    lines = [f"  memory per GPU ({e.name}, micro-batch {e.setting.micro_batch}):"]
    for k, v in e.memory.items():
        if k == "total" or k == "_stage" or not v:
            continue
        label = k[1:] + " (not used)" if k.startswith("_") else k
        lines.append(f"    {label:<42} {v / GB:8.2f} GB")
    if "_stage" in e.memory:
        lines.append(f"    (pipeline stage {e.memory['_stage']}, the one that needs most)")
    lines.append(f"    {'total':<42} {e.memory['total'] / GB:8.2f} GB")
    lines.append("  communication per GPU per step:")
    for t in e.step.traffic:
        how = "overlapped with compute" if t.overlapped else "exposed"
        lines.append(f"    {t.kind:<42} {t.bytes / GB:8.1f} GB over {t.link} ({how})")
    return lines


def format_plan(p: dict, shape: ModelShape) -> str:
    g = p["gpu"]
    lines = [*[f"note: {n}" for n in shape.notes],
             f"model: {shape.frozen / 1e9:.2f}e9 frozen + {shape.trainable / 1e9:.2f}e9 trainable parameters; "
             f"one decoder layer of both towers {shape.layer_both_towers / 1e9:.3f}e9",
             f"cluster: {p['nodes']} nodes x {p['gpus_per_node']} {g.name} = {p['world']} GPUs "
             f"({g.usable / GB:.0f} of {g.memory / GB:.0f} GB usable, {g.peak / 1e12:.0f} TFLOP/s bf16, "
             f"NVLink {g.nvlink / GB:.0f} GB/s, network {g.network / GB:.0f} GB/s per GPU)",
             f"workload: {p['global_seqs']} sequences of {p['configured'].workload.seq_len} tokens per step; "
             f"documents of {p['caption_tokens']} caption tokens + {shape.tokens_per_image} image tokens; "
             f"compute at {100 * p['efficiency']:.0f}% of peak",
             "",
             f"{'setting':<34} {'mb x GA':<8} {'GB/GPU':>7} {'':<5}{'comm GB':>9} {'compute':>8} {'comm s':>8}"
             f" {'step s':>8} {'MFU':>7} {'tok/s/GPU':>9}"]
    lines.append(_row(p["configured"], g.usable))
    lines += [_row(e, g.usable) for e in p["weighed"]]
    lines += [f"fails: {e.name}: {e.cannot_run}" for e in (p["configured"], *p["weighed"]) if e.cannot_run]
    lines.append("")
    lines += _breakdown(p["configured"])
    best = p["best"]
    if best is None:
        lines += ["", "no setting fits: add nodes, or a GPU with more memory"]
    else:
        lines += ["", f"best fitting setting: {best.name} with micro-batch {best.setting.micro_batch} x "
                      f"{best.setting.grad_accum} accumulation: MFU {100 * best.step.mfu:.1f}% "
                      f"({best.step.step_s:.2f} s per step)"]
        lines += _breakdown(best)
        keys = ds_settings(best)
        lines.append("  to use it: " + " ".join(f"{k}={v}" for k, v in keys["run_config"].items()))
        lines.append(f"  and in the DeepSpeed JSON: {keys['deepspeed']}")
    return "\n".join(lines)


def _estimate_json(e: Estimate) -> dict:
    return {"name": e.name, "setting": dataclasses.asdict(e.setting), "fits": e.fits, "cannot_run": e.cannot_run,
            "memory_bytes": {k.lstrip("_"): v for k, v in e.memory.items()},
            "traffic": [dataclasses.asdict(t) for t in e.step.traffic],
            "compute_s": e.step.compute_s, "comm_s": e.step.comm_s, "step_s": e.step.step_s, "mfu": e.step.mfu,
            "tokens_per_s_per_gpu": e.step.tokens_per_s_per_gpu, "settings": ds_settings(e)}


def plan_json(p: dict, shape: ModelShape) -> dict:
    return {"notes": shape.notes, "frozen_params": shape.frozen, "trainable_params": shape.trainable,
            "layer_both_towers": shape.layer_both_towers, "world": p["world"], "nodes": p["nodes"],
            "gpus_per_node": p["gpus_per_node"], "gpu": dataclasses.asdict(p["gpu"]) | {"usable": p["gpu"].usable},
            "global_seqs": p["global_seqs"], "efficiency": p["efficiency"], "caption_tokens": p["caption_tokens"],
            "configured": _estimate_json(p["configured"]), "weighed": [_estimate_json(e) for e in p["weighed"]],
            "best": _estimate_json(p["best"]) if p["best"] else None}
