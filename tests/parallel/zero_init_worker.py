"""Run under `deepspeed --num_gpus 2`: builds the tiny fused model with parallel.zero_init
and checks, on every rank, that (1) every parameter was born partitioned (ZeRO-3 ds_id,
local shard smaller than the whole), and (2) gathered, each image-tower tensor equals its
text-tower twin, which equals the base checkpoint on disk, and (3) with a LLaVA base, its
vision encoder and projector are partitioned too and equal the VLM's own load. Prints
ZERO_INIT_OK (and ZERO_INIT_VLM_OK) with the group's number.

    zero_init_worker.py CONFIG [overrides] [--then overrides] ...

Each group (the overrides before, between and after --then) a fresh model in this one
launch: a launch is ~10 s of start-up on two shared cores."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402
from worker_args import config_and_groups  # noqa: E402  (this directory: the script's own)


def main():
    config, groups = config_and_groups(sys.argv[1:])
    env = setup_environment()
    init_distributed(env)
    for i, overrides in enumerate(groups):
        check(load_config(config, ["parallel.zero_init=true", *overrides]), env, i)


def check(cfg, env, group: int) -> None:
    import torch.distributed as dist

    from megafusion.model.loading import load_base_model
    from megafusion.parallel.gather import gathered
    from megafusion.parallel.model_setup import build_model

    ds = deepspeed_config(cfg, env.world_size)
    model = build_model(cfg, ds)
    layers = dict(model.named_parameters())
    big = [n for n, p in layers.items() if (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) >= 1000]
    not_partitioned = [n for n in big if not hasattr(layers[n], "ds_id") or layers[n].ds_tensor.numel() >= layers[n].ds_numel]
    assert not not_partitioned, f"not partitioned: {not_partitioned[:5]}"
    base = load_base_model(cfg.model.base).state_dict()
    for i, layer in enumerate(model.layers):
        for (name, t), (_, im) in zip(layer.text.named_parameters(), layer.image.named_parameters()):
            with gathered([t, im]):
                assert torch.equal(t, im), f"layer {i} {name}: image twin differs"
                key = f"model.layers.{i}." + ({"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
                                                "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj"}
                                               .get(name.split(".")[0], name.split(".")[0])) + "." + name.split(".", 1)[1]
                assert torch.equal(t.detach(), base[key]), f"{key} differs from the base"
    if model.understanding is not None:  # a LLaVA base: its vision parts, born partitioned, equal its own load
        from megafusion.model.loading import load_base

        reference = dict(load_base(cfg.model.base)[1].named_parameters())
        vision = list(model.understanding.named_parameters())
        assert vision and all(hasattr(p, "ds_id") for _, p in vision)
        for name, p in vision:
            with gathered([p]):
                assert torch.equal(p.detach(), reference[name]), f"{name} differs from the base VLM's"
        print(f"ZERO_INIT_VLM_OK group {group} rank {dist.get_rank()}: {len(vision)} vision tensors", flush=True)
    dist.barrier()
    print(f"ZERO_INIT_OK group {group} rank {dist.get_rank()}: {len(big)} partitioned tensors", flush=True)


if __name__ == "__main__":
    main()
