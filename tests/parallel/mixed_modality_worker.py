"""Run under `deepspeed --num_gpus 2`: ZeRO-3 where rank 0's batch is text only and rank
1's holds images (one of them a condition image, so some image positions carry no
diffusion loss). Before the fix, rank 0 skipped the image modules, so the ranks' parameter
gathers and gradient reductions no longer matched (a hang or wrong values).

Reference (independent of DeepSpeed): a plain copy of the same model, taken before
deepspeed.initialize, computes the mean of the two ranks' losses on both batches and
backpropagates; DeepSpeed's averaged gradient of every trainable parameter
(safe_get_full_grad) must equal it. Prints MIXED_OK.

    mixed_modality_worker.py CONFIG [overrides] [--then overrides] ...

checks each group of overrides in turn, a fresh model and engine each, in one launch
(most of a launch is start-up)."""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megafusion.config import load_config  # noqa: E402
from megafusion.parallel.ds_config import deepspeed_config  # noqa: E402
from megafusion.parallel.launch import init_distributed, setup_environment  # noqa: E402
from worker_args import config_and_groups  # noqa: E402  (this directory: the script's own)


def batches(model, cfg):
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment

    g = torch.Generator().manual_seed(1)
    tpi, latent = model.tokens_per_image, model.image_tokenizer.latent_shape
    # With a VAE and data.use_latents=false the batches hold pixels, encoded by the model
    # (the path shards without latents take); otherwise latents (pixel mode's latents
    # are its pixels).
    pixels = model.image_tokenizer.vae is not None and not cfg.data.use_latents
    shape = (3, cfg.model.image_size, cfg.model.image_size) if pixels else latent
    kw = dict(seq_len=tpi * 3, tokens_per_image=tpi, image_shape=shape, images_are_latents=not pixels)
    text = PackedBatch.from_rows([[[TextSegment([5, 9, 23, 7, 11, 3])], [TextSegment([4, 8, 15, 16, 23, 42, 2])]]],
                                 **kw)
    img = lambda: torch.rand(shape, generator=g) * 2 - 1  # noqa: E731
    boi, eoi = model.boi_id, model.eoi_id
    gen = [TextSegment([5, 9, 23]), TextSegment([boi], loss=False), ImageSegment(img(), timestep=700.0),
           TextSegment([eoi], loss=False)]
    und = [TextSegment([boi], loss=False), ImageSegment(img(), timestep=0.0, is_condition=True),
           TextSegment([eoi, 12, 13, 14])]
    images = PackedBatch.from_rows([[gen, und]], **kw)
    noise = torch.randn((images.images.shape[0], *latent), generator=g)
    return text, images, noise


def main():
    config, groups = config_and_groups(sys.argv[1:])
    env = setup_environment()
    init_distributed(env)
    for overrides in groups:
        check(load_config(config, ["train.grad_clip=0", *overrides]), env, " ".join(overrides) or "defaults")


def check(cfg, env, label):
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from megafusion.parallel.engine import initialize
    from megafusion.parallel.model_setup import build_model

    torch.manual_seed(0)
    model = build_model(cfg, deepspeed_config(cfg, env.world_size))
    reference = copy.deepcopy(model)
    engine, _, _ = initialize(model, cfg, deepspeed_config(cfg, env.world_size))
    text, images, noise = batches(reference, cfg)
    rank = dist.get_rank()

    out = engine(text) if rank == 0 else engine(images, noise=noise)
    engine.backward(out.loss)
    # No megafusion module's forward reads a parameter of another module: ZeRO-3 would
    # gather it there and hold it until the reader is released, after its backward (an
    # "external parameter"). The one on purpose: a tied embedding, which the root holds
    # all step (engine.py). (transformers' CLIP embeddings read their patch embedding's
    # dtype so; frozen, with no backward, they release it after their forward.)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    external = sorted(f"{where or 'root'} reads {names.get(key, '?')}" for where, m in engine.module.named_modules()
                      if type(m).__module__.startswith("megafusion.") for key in getattr(m, "_external_params", {}))
    tied = ["root reads embed_tokens.weight"] if model.tied_embeddings else []
    assert external == tied, f"parameters read outside their module: {external}"

    ref_loss = (reference(text).loss + reference(images, noise=noise).loss) / 2
    ref_loss.backward()
    worst, checked = 0.0, 0
    for (name, p), (_, r) in zip(engine.module.named_parameters(), reference.named_parameters()):
        if not p.requires_grad:
            continue
        g = safe_get_full_grad(p)
        assert g is not None, f"{name}: no gradient under ZeRO-3"
        want = r.grad if r.grad is not None else torch.zeros_like(r)
        err = (g.float() - want.float()).abs().max().item()
        assert err <= 1e-5 * max(1.0, want.abs().max().item()), f"{name}: ZeRO-3 gradient differs by {err}"
        worst, checked = max(worst, err), checked + 1
    dist.barrier()
    print(f"MIXED_OK rank {rank} [{label}]: {checked} gradients, max abs diff {worst:.2e}", flush=True)


if __name__ == "__main__":
    main()
