"""Run as one rank (`python bf16_zero_init_worker.py configs/tiny.yaml`): tiny.yaml with
the large configs' precision, train.dtype=bf16 and parallel.zero_init=true, for both
patchers and for the linear one with image-only blocks (model.patcher_layers, diffusers'
transformer blocks, which ZeRO-3 must gather and partition like the rest, and the prompt
vector they read, which calls the partitioned text norm a second time in the forward). Before the fix deepspeed.initialize asserted in ZeRO-3's defragment (the image
tokenizer was fp32 beside bf16 tower copies).

Reference: the same model built whole (parallel.zero_init=false), which
deepspeed.initialize casts itself; both paths must give every parameter and buffer the
same dtype. Then one optimiser step must give a finite loss and gradient norm. Prints
BF16_ZERO_INIT_OK <variant>."""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402


def dtypes(module) -> dict:
    out = {f"param {n}": p.dtype for n, p in module.named_parameters()}
    out.update({f"buffer {n}": b.dtype for n, b in module.named_buffers()})
    return out


VARIANTS = {"linear": ["model.patcher=linear"], "unet": ["model.patcher=unet"],
            "blocks": ["model.patcher=linear", "model.patcher_layers=1", "model.image_position=sincos",
                       "model.prompt_context=true"]}


def build(config: str, variant: str, zero_init: bool):
    from megafusion.parallel.engine import initialize
    from megafusion.parallel.model_setup import build_model

    cfg = load_config(config, ["train.dtype=bf16", f"parallel.zero_init={str(zero_init).lower()}",
                               *VARIANTS[variant]])
    ds = deepspeed_config(cfg, 1)
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    engine, _, _ = initialize(model, cfg, ds)
    return cfg, engine


def main():
    config = sys.argv[1]
    init_distributed(setup_environment())
    from mixed_modality_worker import batches

    for variant in VARIANTS:
        cfg, engine = build(config, variant, zero_init=True)
        trainable = {p.dtype for p in engine.module.parameters() if p.requires_grad}
        assert trainable == {torch.bfloat16}, f"{variant}: trainable dtypes {trainable}"
        _, images, noise = batches(engine.module, cfg)
        out = engine(images, noise=noise)
        engine.backward(out.loss)
        engine.step()
        norm = float(engine.get_global_grad_norm())
        assert math.isfinite(out.loss.item()) and math.isfinite(norm) and norm > 0, (out.loss.item(), norm)

        _, whole = build(config, variant, zero_init=False)
        got, want = dtypes(engine.module), dtypes(whole.module)
        assert got.keys() == want.keys()
        differ = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
        assert not differ, f"{variant}: zero_init dtypes differ from deepspeed's own cast: {list(differ.items())[:5]}"
        print(f"BF16_ZERO_INIT_OK {variant}: {len(got)} tensors, loss {out.loss.item():.4f}, grad norm {norm:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
