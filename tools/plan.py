"""Plan a run before submitting it: memory per GPU by part, communication per step by
kind, a step time and MFU, for ZeRO-3 (with and without ZeRO++), ZeRO-2 and pipeline +
ZeRO-1, and the best setting that fits.

    python tools/plan.py --config configs/llama3_70b.yaml --nodes 8 [--gpus-per-node 8]
                         [--gpu h100-80gb|h200|a100-80gb|b200] [--arch llama3-70b|CONFIG.json]
                         [--efficiency 0.55] [--caption-tokens 32] [key=value ...] [--json]

key=value are run-config overrides, as for megafusion/train.py (e.g. train.micro_batch_size=4).
The model is built on the meta device from the config (no weights are read); the
arithmetic and its sources are in megafusion/plan/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/plan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb (default), h200, a100-80gb, b200")
    p.add_argument("--arch", default=None, help="base architecture when model.base is not on this machine: "
                   "llama3-8b, llama3-70b, llama3.2-1b, or a Llama's or LLaVA's config.json (a LLaVA's "
                   "counts its vision tower)")
    p.add_argument("--efficiency", type=float, default=0.55,
                   help="share of peak FLOP/s the kernels reach (default 0.55)")
    p.add_argument("--caption-tokens", type=int, default=32, help="text tokens per image-caption document (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("overrides", nargs="*", help="run-config overrides section.key=value")
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from megafusion.config import ConfigError, load_config
    from megafusion.plan.choose import plan
    from megafusion.plan.hardware import gpu
    from megafusion.plan.report import format_plan, plan_json
    from megafusion.plan.shapes import PlanError, model_shape

    try:
        if not 0 < args.efficiency <= 1:
            raise PlanError(f"--efficiency {args.efficiency}: must be in (0, 1]")
        cfg = load_config(args.config, args.overrides)
        shape = model_shape(cfg, args.arch)
        result = plan(cfg, shape, args.nodes, args.gpus_per_node, gpu(args.gpu), efficiency=args.efficiency,
                      caption_tokens=args.caption_tokens)
    except (ConfigError, PlanError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(plan_json(result, shape), indent=1) if args.json else format_plan(result, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
