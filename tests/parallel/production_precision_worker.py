"""Run under `deepspeed --num_gpus 2`: tiny.yaml with the large configs' precision and
memory settings (bf16, parallel.zero_init, activation checkpointing, U-Net patcher) on
ZeRO-3. Rank 0 trains on a batch with images, rank 1 on a text-only one.

1. Gradients: reference is a plain fp32 copy of the model (built whole, no DeepSpeed,
   no checkpointing) holding the same weights, upcast; it computes the mean of the two
   ranks' losses and backpropagates. DeepSpeed's averaged bf16 gradient of every
   trainable parameter (safe_get_full_grad) must agree within bf16 tolerance.
2. Activation checkpointing (torch's non-reentrant, see parallel/model_setup.py) really
   recomputes under ZeRO-3: every decoder layer runs twice per training step (forward,
   recompute in backward), once in the reference.
3. Frozen digest (parallel/frozen.py) on ZeRO-3 partitions: unchanged after an optimiser
   step; one flipped bit in one frozen partition on rank 1 makes the check fail on
   both ranks.
Prints PRODUCTION_OK."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402

PRODUCTION = ["train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true",
              "model.patcher=unet", "train.grad_clip=0"]
# bf16 keeps 8 bits of mantissa: each rounding is ~0.4% relative; through two layers,
# the U-Net and a softmax over the vocabulary the worst tensor measured 1.2%.
REL_TOL = 0.05


def count_layer_calls(model) -> list[int]:
    calls = [0]
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(args[0], [*PRODUCTION, *args[1:]])
    env = setup_environment()
    init_distributed(env)
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from mixed_modality_worker import batches

    from megafusion.parallel import frozen
    from megafusion.parallel.engine import initialize
    from megafusion.parallel.gather import gathered
    from megafusion.parallel.model_setup import build_model

    rank = dist.get_rank()
    torch.manual_seed(0)
    ds = deepspeed_config(cfg, env.world_size)
    engine, _, _ = initialize(build_model(cfg, ds), cfg, ds)
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    digest = frozen.digest(engine.module)

    ref_cfg = load_config(args[0], ["train.dtype=fp32", "parallel.zero_init=false", "model.patcher=unet",
                                    "model.activation_checkpointing=false", *args[1:]])
    reference = build_model(ref_cfg, {})
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            with gathered([p]):
                ref_params[name].copy_(p.detach().float())

    text, images, noise = batches(reference, cfg)
    calls, ref_calls = count_layer_calls(engine.module), count_layer_calls(reference)
    out = engine(images, noise=noise) if rank == 0 else engine(text)
    engine.backward(out.loss)
    n_layers = len(reference.layers)
    assert calls[0] == 2 * n_layers, f"{calls[0]} layer calls, expected forward + recompute = {2 * n_layers}"

    ref_loss = (reference(images, noise=noise).loss + reference(text).loss) / 2
    ref_loss.backward()
    assert ref_calls[0] == 2 * n_layers  # two forwards, no recompute
    worst, checked = 0.0, 0
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)
        assert g is not None, f"{name}: no gradient under ZeRO-3"
        want = ref_params[name].grad
        want = torch.zeros_like(ref_params[name]) if want is None else want
        err = (g.float() - want).norm().item()
        scale = want.norm().item()
        assert err <= REL_TOL * scale + 1e-6, f"{name}: bf16 gradient off by {err:.3g} (|ref| {scale:.3g})"
        worst, checked = max(worst, err / max(scale, 1e-12)), checked + 1

    engine.step()
    assert frozen.check_unchanged(engine.module, digest, engine.device) == len(digest)
    victim = next(p for p in engine.module.parameters() if not p.requires_grad and p.ds_tensor.numel())
    if rank == 1:
        with torch.no_grad():
            victim.ds_tensor.view(torch.int16).reshape(-1)[0] ^= 1  # one mantissa bit
    try:
        frozen.check_unchanged(engine.module, digest, engine.device)
    except SystemExit as exc:
        assert "frozen weights changed" in str(exc)
    else:
        raise AssertionError(f"rank {rank}: a flipped bit in a frozen partition went unnoticed")
    dist.barrier()
    print(f"PRODUCTION_OK rank {rank}: {checked} gradients, worst relative error {worst:.2e}, "
          f"{len(digest)} frozen shares", flush=True)


if __name__ == "__main__":
    main()
