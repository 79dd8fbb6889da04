"""tools/convert_to_hf.py streams (megafusion/export_stream.py): an export's host memory
scales with one decoder layer, not with the model, and what it writes is what the
whole-model exporter writes.

The model is deep and narrow, so that it is many layers and no tensor is much larger
than a layer: tools/make_tiny_llama.py's Llama with 32 layers and an MLP of 8192 (one
fused layer, both towers, is 12.7 MB in fp32; the exported model 418 MB, of which the
embedding is 12.6 MB). Each kind of checkpoint is made by the real trainer (short rows,
one per step, small communication buckets: this machine's memory is shared). References:
the base model on disk (a layer's size), and the whole-model exporter, export_fused of
load_checkpoint_model (DeepSpeed's zero_to_fp32 or the checkpoint files loaded whole,
then transformers' save_pretrained)."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_convert_to_hf import PY, REPO, convert_here, train

WORKER = str(Path(__file__).resolve().parent / "export_memory_worker.py")
LAYERS, MLP = 32, 8192
MiB = 2 ** 20
# What an export holds besides the tensors it is writing, whatever the model: the base
# tokenizer (SmolLM2's: 42 MB) and its copy with the image tokens (17 MB), the
# meta-device model, library code paged in on first use. Measured here: 68-72 MB (with
# 1 MB shards); the peaks with a layer per shard are 78-87 MB.
OVERHEAD = 80 * MiB

KINDS = {  # run config overrides, DeepSpeed config
    "zero3": (["parallel.zero_stage=3"], "ds_configs/zero3.json"),
    "zero2": (["parallel.zero_stage=2"], "ds_configs/zero3.json"),
    "stage0": (["parallel.zero_stage=0"], "ds_configs/zero3.json"),
    "pipeline": (["parallel.pipeline_stages=2", "parallel.zero_stage=1"], "ds_configs/pipeline_zero1.json"),
}


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    import tools.make_tiny_llama as M

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "TINY", dict(M.TINY, num_hidden_layers=LAYERS, intermediate_size=MLP))
        return str(M.make_tiny_llama(tmp_path_factory.mktemp("deep") / "deep-llama", seed=0))


@pytest.fixture(scope="module", params=list(KINDS))
def deep_run(request, tmp_path_factory, deep_llama, synthetic_shards):
    overrides, ds_config = KINDS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    # The shipped configs' communication buckets are sized for 8B/70B layers and DeepSpeed
    # allocates buffers up to that size (a ZeRO-3 rank of this model reached 3.4 GB with
    # them on this machine): buckets of 1e7 elements here.
    ds = json.loads((REPO / ds_config).read_text())
    ds["zero_optimization"].update({k: 10 ** 7 for k in ("reduce_bucket_size", "allgather_bucket_size",
                                                         "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                                                         "stage3_max_reuse_distance", "sub_group_size")})
    (root / "ds.json").write_text(json.dumps(ds))
    run = train(root / "run", synthetic_shards, f"model.base={deep_llama}", "data.seq_len=128",
                "train.micro_batch_size=1", f"parallel.ds_config={root / 'ds.json'}", *overrides)
    return request.param, run


def base_tensors(base_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def fused_layer_bytes(base_dir) -> int:
    """One decoder layer of the fused model in fp32: the base's layer (the text tower)
    and its trainable copy (the image tower)."""
    layer = [t for k, t in base_tensors(base_dir).items() if k.startswith("model.layers.0.")]
    return 2 * 4 * sum(t.numel() for t in layer)


def export_tensors(d) -> tuple[dict, dict]:
    """{name: (file, tensor)} of an exported directory and its index (or None)."""
    d = Path(d)
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            out.update({k: (f.name, h.get_tensor(k)) for k in h.keys()})
    index = d / "model.safetensors.index.json"
    return out, json.loads(index.read_text()) if index.is_file() else None


def measured_export(run, out, *args) -> int:
    """Peak resident bytes of tools/convert_to_hf.py above what its process held before."""
    result = out.parent / f"{out.name}.memory.json"
    p = subprocess.run([PY, WORKER, str(result), str(run), str(out), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(result.read_text())
    return r["peak"] - r["rss_before"]


@pytest.mark.slow
def test_export_memory_scales_with_one_layer(deep_run, deep_llama, tmp_path):
    kind, run = deep_run
    layer = fused_layer_bytes(deep_llama)
    shard = layer  # --max-shard-size: a layer per shard
    out = tmp_path / "export"
    peak = measured_export(run, out, "--max-shard-size", f"{-(-shard // 1000)}KB", "--dtype", "fp32")
    model = sum(t.nbytes for _, t in export_tensors(out)[0].values())
    # One shard being filled, the checkpoint pages and the layer being made: a few layers.
    bound = shard + 2 * layer + OVERHEAD
    print(f"{kind}: export peak {peak / MiB:.1f} MiB; bound {bound / MiB:.1f} MiB (fused layer {layer / MiB:.1f} MiB); "
          f"model {model / MiB:.1f} MiB")
    assert model >= 3 * bound  # the test model is large against the bound, or the bound says nothing
    assert peak <= bound, f"{kind}: the export held {peak / MiB:.0f} MiB, more than {bound / MiB:.0f} MiB"


@pytest.mark.slow
def test_streamed_export_is_the_whole_model_export(deep_run, tmp_path):
    """bf16 and a shard size that cuts layers apart: the same tensors (names, dtypes,
    values, shard of each), index and config as export_fused of the whole model."""
    from megafusion.checkpoint_reader import load_checkpoint_model
    from megafusion.export import export_fused, special_ids
    from megafusion.model.loading import load_tokenizer

    kind, run = deep_run
    streamed = tmp_path / "streamed"
    p = convert_here(run, streamed, "--dtype", "bf16", "--max-shard-size", "5MB")
    assert p.returncode == 0, p.stderr[-3000:]
    fused, cfg, _ = load_checkpoint_model(run)
    tok = load_tokenizer(cfg.model.base)
    bos, eos = special_ids(tok, cfg.data)
    whole = export_fused(fused, tok, tmp_path / "whole", bos=bos, eos=eos, dtype=torch.bfloat16, max_shard_size="5MB",
                         generation_defaults={"image_num_inference_steps": cfg.log.sample_diffusion_steps})
    got, got_index = export_tensors(streamed)
    want, want_index = export_tensors(whole)
    assert got.keys() == want.keys()
    for name, (file, t) in want.items():
        assert got[name][0] == file, name
        assert got[name][1].dtype == torch.bfloat16 == t.dtype and torch.equal(got[name][1], t), name
    assert want_index is not None and got_index == want_index
    for f in ("config.json", "generation_config.json"):
        assert (streamed / f).read_text() == (whole / f).read_text(), f
    # The frozen text tower is the base's, bit for bit (through bf16).
    base = base_tensors(cfg.model.base)
    q = "model.layers.5.self_attn.q_proj.weight"
    assert torch.equal(got["model.layers.5.text.q_proj.weight"][1], base[q].to(torch.bfloat16))
    assert not torch.equal(got["model.layers.5.image.q_proj.weight"][1], got["model.layers.5.text.q_proj.weight"][1])


def test_vae_unet_checkpoint_streams_as_the_whole_model(tmp_path, tiny_llama_untied):
    """VAE space (the VAE in vae/), a U-Net patcher and an untied base, from a stage-0
    checkpoint laid out as DeepSpeed writes it (the trainable weights in the `module`
    entry of mp_rank_00_model_states.pt) without a training run: the streamed export
    equals the whole-model one and holds the weights of that file."""
    from diffusers import AutoencoderKL

    from megafusion.config import load_config, save_resolved
    from megafusion.checkpoint_reader import load_checkpoint_model
    from megafusion.export import export_checkpoint, export_fused, special_ids
    from megafusion.model.fusion import LMFusionModel
    from megafusion.model.loading import load_tokenizer

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"run.dir={run}", f"model.base={tiny_llama_untied}", "model.image_mode=vae", f"model.vae_path={tmp_path / 'vae'}",
        "model.patcher=unet", "model.unet_channels=[32]", "model.patch_size=2", "parallel.zero_stage=0"])
    save_resolved(cfg, run / "config.yaml")
    fused = LMFusionModel.from_base(cfg.model.base, cfg.model)
    module = {n: (p.detach() + 0.01 * torch.randn_like(p)) for n, p in fused.named_parameters() if p.requires_grad}
    (run / "checkpoints" / "global_step2").mkdir(parents=True)
    torch.save({"module": module}, run / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text("global_step2")

    streamed = export_checkpoint(run, tmp_path / "streamed", dtype="bf16", max_shard_size="200KB")
    fused, cfg, _ = load_checkpoint_model(run)
    tok = load_tokenizer(cfg.model.base)
    bos, eos = special_ids(tok, cfg.data)
    whole = export_fused(fused, tok, tmp_path / "whole", bos=bos, eos=eos, dtype=torch.bfloat16,
                         max_shard_size="200KB",
                         generation_defaults={"image_num_inference_steps": cfg.log.sample_diffusion_steps})
    got, got_index = export_tensors(streamed)
    want, want_index = export_tensors(whole)
    assert got.keys() == want.keys() and not any(".vae." in k for k in got)
    assert all(got[k][0] == f and torch.equal(got[k][1], t) for k, (f, t) in want.items())
    assert want_index is not None and got_index == want_index
    for f in ("config.json", "generation_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (streamed / f).read_bytes() == (whole / f).read_bytes(), f
    unet = [k for k in module if k.startswith("image_tokenizer.embedder.")]
    assert unet and all(torch.equal(got["model." + k][1], module[k].to(torch.bfloat16)) for k in unet)
