"""Run on CPU ranks: what DeepSpeed's zero_quantized_nontrainable_weights does to the
frozen text tower of a model megafusion builds with parallel.zero_init. DeepSpeed's
quantizer kernel is CUDA-only; cpu_quantizer.py's stand-in takes its place, so what is
measured is which partitions DeepSpeed chooses to quantize. Prints QUANTIZED_FROZEN
{json} on each rank.

    quantized_frozen_worker.py CONFIG [overrides]

A control: a parameter born frozen inside its module's __init__, under the same
zero.Init, which DeepSpeed does quantize (the stand-in is called)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cpu_quantizer import install  # noqa: E402


class BornFrozen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)


def main():
    import deepspeed

    from megafusion.config import load_config
    from megafusion.parallel.ds_config import deepspeed_config
    from megafusion.parallel.launch import init_distributed, setup_environment
    from megafusion.parallel.model_setup import build_model

    install()
    env = setup_environment()
    init_distributed(env)
    cfg = load_config(sys.argv[1], ["parallel.zero_init=true", *sys.argv[2:]])
    ds = deepspeed_config(cfg, env.world_size)
    ds["zero_optimization"]["zero_quantized_nontrainable_weights"] = True

    model = build_model(cfg, ds)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad and hasattr(p, "ds_tensor")}
    quantized = sorted(n for n, p in frozen.items() if hasattr(p.ds_tensor, "ds_quant_scale"))
    with deepspeed.zero.Init(config_dict_or_path=ds):
        control = BornFrozen()
    print("QUANTIZED_FROZEN " + json.dumps({
        "frozen": len(frozen), "quantized": quantized,
        "frozen_dtypes": sorted({str(p.ds_tensor.dtype) for p in frozen.values()}),
        "control_quantized": hasattr(control.weight.ds_tensor, "ds_quant_scale"),
        "control_dtype": str(control.weight.ds_tensor.dtype)}), flush=True)


if __name__ == "__main__":
    main()
