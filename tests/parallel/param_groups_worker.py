"""Prints the optimiser groups of the tiny fused model as JSON: one line
`GROUPS {"name": {"weight_decay": wd, "lr": peak lr, "params": [parameter names]}, ...}`.

    python param_groups_worker.py CONFIG.yaml [section.key=value ...]

With parallel.zero_init=true it runs as one ZeRO-3 rank (every parameter partitioned,
as in the 8B/70B configs); otherwise no process group is needed."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402


def describe(cfg) -> dict:
    """{"groups": {name: {"weight_decay", "lr", "params": [names]}}, "trainable": [names]}"""
    from megafusion.parallel.engine import parameter_groups
    from megafusion.parallel.model_setup import build_model

    model = build_model(cfg, deepspeed_config(cfg, 1))
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)  # a tied parameter by its first name
    groups = {g["name"]: {"weight_decay": g["weight_decay"], "lr": g["lr"], "params": [names[id(p)] for p in g["params"]]}
              for g in parameter_groups(model, cfg)}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {"groups": groups, "trainable": trainable}


def main():
    cfg = load_config(sys.argv[1], sys.argv[2:])
    if cfg.parallel.zero_init:
        from megafusion.parallel.launch import init_distributed, setup_environment

        init_distributed(setup_environment())
    print("GROUPS " + json.dumps(describe(cfg)), flush=True)


if __name__ == "__main__":
    main()
