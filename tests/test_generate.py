"""Sampling (megafusion/model/inference.py, megafusion/generate.py, the Hugging Face
wrapper) against references that do not share its shortcuts: the training forward
(LMFusionModel.forward over a PackedBatch, no cache), the same sampler without the prompt
cache, the conditional and unconditional passes run separately, and the base model's own
generate()."""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from megafusion import generate as G
from megafusion.model import inference as inf
from megafusion.model import tasks
from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
SIZE, PATCH = 16, 4  # 16 image tokens


def perturb(model, seed=0):
    """Make the image tower and the zero-initialised predictor differ from their start,
    so that a wrong tower, norm or cache would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def base(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def make_fused(base, **kw):
    args = dict(base="tiny", image_mode="pixel", image_size=SIZE, patch_size=PATCH, patcher="linear",
                attention_backend="sdpa")
    args.update(kw)
    return perturb(LMFusionModel(copy.deepcopy(base), FusionConfig(**args))).eval()


@pytest.fixture(scope="module")
def fused(base):
    return make_fused(base)


@pytest.fixture(scope="module")
def fused_rf(base):
    return make_fused(base, objective="rectified_flow")


@pytest.fixture(scope="module")
def fused_x0(base):
    """Rectified flow with x-prediction (model.prediction_type=sample) and the learned
    image position table."""
    return make_fused(base, objective="rectified_flow", prediction_type="sample", image_position="learned")


@pytest.fixture(scope="module")
def fused_shared(base):
    """Rectified flow with every token of an image at one RoPE position
    (model.image_rope=shared) and the learned table as its place."""
    return make_fused(base, objective="rectified_flow", image_position="learned", image_rope="shared")


@pytest.fixture(scope="module")
def fused_blocks(base):
    """Rectified flow with image-only blocks on both sides of the patcher
    (model.patcher_layers) and the sincos table."""
    return make_fused(base, objective="rectified_flow", image_position="sincos", patcher_layers=1)


@pytest.fixture(scope="module")
def fused_context(base):
    """fused_blocks whose output blocks also read the prompt's vector
    (model.prompt_context)."""
    return make_fused(base, objective="rectified_flow", image_position="sincos", patcher_layers=1,
                      prompt_context=True)


@pytest.fixture(scope="module")
def fused_2d(base):
    """Rectified flow with rows and columns as RoPE offsets (model.image_rope=2d)."""
    return make_fused(base, objective="rectified_flow", image_rope="2d")


def pixel_image_batch(model, g: torch.Generator, text_seed: int, timestep: float) -> PackedBatch:
    """One document of a VAE-space model: BOS, 4 text tokens, a random 32x32 image in
    pixels (the VAE's encoder runs) at `timestep`, EOI."""
    pixels = torch.rand(3, 32, 32, generator=g) * 2 - 1
    doc = [TextSegment([1] + ids(4, text_seed) + [model.boi_id]), ImageSegment(pixels, timestep=timestep),
           TextSegment([model.eoi_id])]
    T = model.tokens_per_image
    return PackedBatch.from_rows([[doc]], seq_len=1 + 4 + 1 + T + 1, tokens_per_image=T, images_are_latents=False)


def ids(n, seed, vocab=49152):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def training_forward(model, rows, noise=None):
    """rows: lists of TextSegment / ImageSegment documents, one per row."""
    T = model.tokens_per_image
    L = max(sum(len(s.ids) if isinstance(s, TextSegment) else T for s in r) for r in rows)
    batch = PackedBatch.from_rows([[r] for r in rows], seq_len=L, tokens_per_image=T)
    with torch.no_grad():
        return model(batch, noise=noise, return_logits=True)


# ------------------------------------------------------------------- the forward paths

def check_cached_denoising_step(model, seed):
    """The cached and uncached denoisers' step and the logits at BOI against the training
    forward over [BOS caption BOI image EOI EOS]; returns the image."""
    boi, eoi = model.boi_id, model.eoi_id
    cap = ids(7, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1
    noise = torch.randn(1, 3, SIZE, SIZE, generator=g)
    ref = training_forward(model, [[TextSegment([1] + cap), TextSegment([boi]), ImageSegment(x0, timestep=700.0),
                                    TextSegment([eoi, 2])]], noise=noise)
    prompt = [[1] + cap + [boi]]
    cache, logits = inf.prefill(model, prompt)
    t = torch.tensor([700.0])
    cached = tasks.cached_denoiser(model, cache)(ref.noisy_images, t)
    uncached = tasks.uncached_denoiser(model, prompt)(ref.noisy_images, t)
    assert ref.image_prediction.abs().max() > 0.1
    assert (cached - ref.image_prediction).abs().max().item() <= TOL
    assert (uncached - ref.image_prediction).abs().max().item() <= TOL
    assert (logits[0] - ref.logits[0, len(cap) + 1]).abs().max().item() <= TOL  # at BOI
    return x0


@pytest.mark.parametrize("which", ["fused", "fused_rf", "fused_x0", "fused_shared", "fused_2d", "fused_blocks",
                                   "fused_context"])
def test_cached_denoising_step_equals_the_training_forward(which, request):
    check_cached_denoising_step(request.getfixturevalue(which), seed=1)


@pytest.mark.parametrize("which", ["fused", "fused_shared", "fused_2d"])
def test_prefill_with_an_image_and_padding_equals_the_training_forward(which, request):
    """A clean image inside a row, batched with a longer text row (left padding): the
    logits at every text position."""
    fused = request.getfixturevalue(which)
    boi, eoi = fused.boi_id, fused.eoi_id
    img = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    caption = ids(6, 4)
    ref = training_forward(fused, [[TextSegment([1, boi]), ImageSegment(img, timestep=0.0, is_condition=True),
                                    TextSegment([eoi] + caption)]]).logits[0]
    rows = [[[1, boi], img, [eoi] + caption], [[1] + ids(40, 7)]]
    got = inf.all_logits(fused, inf.forward_tokens(fused, inf.encode_rows(rows, fused.tokens_per_image)))[0]
    got = got[-ref.shape[0]:]  # the row is left-padded
    text = torch.ones(ref.shape[0], dtype=torch.bool)
    text[2:2 + fused.tokens_per_image] = False
    assert (got[text] - ref[text]).abs().max().item() <= TOL
    assert got[:-ref.shape[0]].abs().sum() == 0 if got.shape[0] > ref.shape[0] else True


# -------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("which", ["fused", "fused_rf"])
def test_cached_sampling_equals_uncached(which, request):
    """In float64: the two paths add up attention over different key lengths (the cache
    against the whole sequence), and in fp32 the CPU SDPA kernel's blocking makes that a
    rounding difference of up to ~6e-6 after six guided DDPM steps, close to TOL and
    over it on some runs. In float64 the difference is rounding-free here (0.0 measured),
    while a wrong cache, mask or position moves samples by far more than 1e-10."""
    check_cached_sampling(request.getfixturevalue(which))


def check_cached_sampling(source):
    model = copy.deepcopy(source).double()
    prompts = [ids(9, 10), ids(3, 11)]  # different lengths: left padding
    kw = dict(bos=1, boi=model.boi_id, num_images=2, steps=6, guidance_scale=3.0)
    a = tasks.text_to_image(model, prompts, generator=torch.Generator().manual_seed(0), use_cache=True, **kw)
    b = tasks.text_to_image(model, prompts, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
    assert a.shape == (4, 3, SIZE, SIZE)
    assert (a - b).abs().max().item() <= 1e-10
    assert not torch.equal(a[0], a[1])  # two samples per prompt, different noise


def test_batched_cfg_equals_the_two_passes_separately(fused_rf):
    model = fused_rf
    boi = model.boi_id
    cond_rows, uncond_rows = [[1] + ids(8, 12) + [boi]], [[1, boi]]
    batched = tasks.cached_denoiser(model, inf.prefill(model, cond_rows + uncond_rows)[0])
    cond = tasks.cached_denoiser(model, inf.prefill(model, cond_rows)[0])
    uncond = tasks.cached_denoiser(model, inf.prefill(model, uncond_rows)[0])

    def separate(x, t):
        return torch.cat([cond(x[:1], t[:1]), uncond(x[1:], t[1:])])

    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    assert (batched(torch.cat([x, x]), t) - separate(torch.cat([x, x]), t)).abs().max().item() <= TOL
    a = tasks.sample_latents(model, batched, 1, steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(1))
    b = tasks.sample_latents(model, separate, 1, steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max().item() <= TOL
    # The batched path is what text_to_image runs: [BOS] caption [BOI] against [BOS][BOI].
    c = tasks.text_to_image(model, [cond_rows[0][1:-1]], bos=1, boi=boi, steps=5, guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(1))
    assert (a - c).abs().max().item() <= TOL


# ------------------------------------------------------------------------------ text

def test_text_is_the_base_models_greedy_output(fused, base):
    prompts = [ids(5, 20), ids(11, 21)]
    got = tasks.text_to_text(fused, prompts, bos=1, eos=-1, banned=(fused.boi_id, fused.eoi_id), max_new_tokens=12)
    for p, g in zip(prompts, got):
        ref = base.generate(torch.tensor([[1] + p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p) + 1:].tolist()
        assert g == ref


def test_hf_wrapper_forward_and_generate_are_the_base_models(fused, base):
    from megafusion.model.hf import LMFusionForCausalLM, MegafusionConfig

    config = MegafusionConfig(base_config=fused.llama_config.to_diff_dict(), fusion=dataclasses.asdict(fused.cfg))
    hf = LMFusionForCausalLM(config, fused=fused).eval()
    x = torch.tensor([[0, 0, 0, 1] + ids(6, 30), [1] + ids(9, 31)])
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        got = hf(input_ids=x, attention_mask=mask).logits[..., :fused.vocab_size]
        for r in range(2):
            n = int(mask[r].sum())
            ref = base(x[r:r + 1, -n:]).logits
            assert (got[r, -n:] - ref[0]).abs().max().item() <= TOL
        out = hf.generate(x, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          eos_token_id=None, pad_token_id=0, suppress_tokens=[fused.boi_id, fused.eoi_id])
        for r in range(2):
            n = int(mask[r].sum())
            ref = base.generate(x[r:r + 1, -n:], max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
            assert out[r, -10:].tolist() == ref[0, -10:].tolist()


def test_caption_with_the_cache_equals_greedy_over_the_training_forward(fused):
    boi, eoi = fused.boi_id, fused.eoi_id
    imgs = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(40)) * 2 - 1
    got = tasks.image_to_text(fused, imgs, bos=1, boi=boi, eoi=eoi, eos=-1, max_new_tokens=4)
    for i in range(2):
        new = []
        for _ in range(4):
            doc = [TextSegment([1, boi]), ImageSegment(imgs[i], timestep=0.0, is_condition=True), TextSegment([eoi] + new)]
            logits = training_forward(fused, [doc]).logits[0, -1].clone()
            logits[[boi, eoi]] = float("-inf")
            new.append(int(logits.argmax()))
        assert got[i] == new


def test_interleave_places_the_image_and_continues_after_eoi(fused_rf):
    model = fused_rf
    boi, eoi = model.boi_id, model.eoi_id
    prompt = [1] + ids(4, 50)
    seen = []

    def steer(new_ids, logits):  # text, BOI, text, EOS
        seen.append(logits.clone())
        forced = {0: 17, 1: boi, 2: 23, 3: 2}[len(new_ids[0])]
        out = torch.full_like(logits, -1e4)
        out[:, forced] = 0
        return out

    segments = tasks.interleave(model, prompt, boi=boi, eoi=eoi, eos=2, uncond_ids=[1, boi], steps=4,
                              guidance_scale=2.0, generator=torch.Generator().manual_seed(3), logits_processor=steer)
    assert [type(s) for s in segments] == [list, torch.Tensor, list]
    assert segments[0] == [17] and segments[2] == [23]
    # The image is what text_to_image draws for the text so far, same seed.
    ref = tasks.text_to_image(model, [prompt[1:] + [17]], bos=1, boi=boi, steps=4, guidance_scale=2.0,
                            generator=torch.Generator().manual_seed(3))[0]
    assert (segments[1] - ref).abs().max().item() <= TOL
    # After EOI the context holds the clean image: the next-token logits match the
    # training forward over [prompt, 17, BOI, image (t = 0), EOI].
    doc = [TextSegment(prompt + [17, boi]), ImageSegment(segments[1], timestep=0.0), TextSegment([eoi])]
    ref_logits = training_forward(model, [doc]).logits[0, -1]
    assert (seen[2][0] - ref_logits).abs().max().item() <= TOL


# -------------------------------------------------------------- export, load, command line

@pytest.fixture(scope="module")
def exported(tmp_path_factory, fused, tiny_llama):
    """The tiny fused model written as an exported directory (no training needed)."""
    from megafusion.export import export_fused

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = tmp_path_factory.mktemp("export") / "tiny_export"
    export_fused(copy.deepcopy(fused), tok, out, bos=1, eos=2, generation_defaults={"image_num_inference_steps": 3})
    return out


def test_export_of_vae_and_unet_model_loads_back(base, tmp_path, tiny_llama):
    """VAE space (the VAE in vae/, not in the model's safetensors), U-Net patcher, and a
    bf16 export, through the same from_pretrained path as plain transformers."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    from megafusion.export import export_fused
    from megafusion.model.hf import LMFusionForCausalLM

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=32)
    vae.save_pretrained(tmp_path / "vae_src")
    model = make_fused(base, image_mode="vae", vae_path=str(tmp_path / "vae_src"), image_size=32, patch_size=2,
                       patcher="unet", unet_channels=(32,))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = export_fused(copy.deepcopy(model), tok, tmp_path / "vae_export", bos=1, eos=2)
    assert (out / "vae" / "config.json").is_file()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not any(".vae." in k for k in f.keys())
    assert json.loads((out / "config.json").read_text())["fusion"]["vae_path"] == "vae"
    loaded = LMFusionForCausalLM.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(5)
    batch = pixel_image_batch(model, g, text_seed=60, timestep=400.0)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        ref = model(batch, noise=noise, return_logits=True)
        got = loaded.model(batch, noise=noise, return_logits=True)
    assert ref.image_prediction.abs().max() > 0
    assert (got.image_prediction - ref.image_prediction).abs().max().item() <= TOL
    assert (got.logits - ref.logits).abs().max().item() <= TOL
    # bf16 weights
    out16 = export_fused(copy.deepcopy(model), tok, tmp_path / "bf16", bos=1, eos=2, dtype=torch.bfloat16)
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    m16 = LMFusionForCausalLM.from_pretrained(out16, dtype=torch.bfloat16)
    assert m16.model.layers[0].image.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(m16.model.layers[0].image.q_proj.weight, model.layers[0].image.q_proj.weight.to(torch.bfloat16))


def test_save_pretrained_of_a_loaded_vae_export_loads_back(base, tmp_path, tiny_llama):
    """An exported VAE-space model, loaded and saved again with save_pretrained (what a
    user does to copy, re-shard or push it), loads back with the VAE (vae/, where the
    config's relative vae_path points) and gives the outputs of the model it was saved
    from: logits and diffusion prediction from pixels (the VAE's encoder) and decoded
    pixels (its decoder)."""
    from diffusers import AutoencoderKL

    from megafusion.export import export_fused
    from megafusion.model.hf import LMFusionForCausalLM

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=32).save_pretrained(tmp_path / "vae_src")
    model = make_fused(base, image_mode="vae", vae_path=str(tmp_path / "vae_src"), image_size=32, patch_size=2)
    out = export_fused(copy.deepcopy(model), AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "export", bos=1, eos=2)
    loaded = LMFusionForCausalLM.from_pretrained(out).eval()
    loaded.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "vae" / "config.json").is_file()
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["fusion"]["vae_path"] == "vae"
    reloaded = LMFusionForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    g = torch.Generator().manual_seed(7)
    batch = pixel_image_batch(model, g, text_seed=61, timestep=300.0)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        want = loaded.model(batch, noise=noise, return_logits=True)
        got = reloaded.model(batch, noise=noise, return_logits=True)
        want_px = loaded.model.image_tokenizer.decode_latents(latents)
        got_px = reloaded.model.image_tokenizer.decode_latents(latents)
    assert want.image_prediction.abs().max() > 0
    assert torch.equal(got.image_prediction, want.image_prediction) and torch.equal(got.logits, want.logits)
    assert torch.equal(got_px, want_px)


def test_a_saved_guidance_scale_of_zero_is_kept(fused, tiny_llama, tmp_path):
    """generation_config.json's image_guidance_scale is read as saved, 0.0 included, by
    megafusion.generate as by the wrapper's own sampler defaults."""
    from megafusion.export import export_fused

    out = export_fused(copy.deepcopy(fused), AutoTokenizer.from_pretrained(tiny_llama), tmp_path / "export", bos=1,
                       eos=2, generation_defaults={"image_num_inference_steps": 3, "image_guidance_scale": 0.0})
    assert json.loads((out / "generation_config.json").read_text())["image_guidance_scale"] == 0.0
    gen = G.load(out)
    assert (gen.steps, gen.guidance_scale) == (3, 0.0)
    from megafusion.model.hf import LMFusionForCausalLM

    assert LMFusionForCausalLM.from_pretrained(out)._sampler_defaults(None, None) == (3, 0.0)


def test_export_of_x_prediction_with_position_table_loads_back(fused_x0, tmp_path, tiny_llama):
    """The learned position table and prediction_type=sample survive the export: the
    loaded model's cached denoising step (a velocity) equals the source model's."""
    from megafusion.export import export_fused
    from megafusion.model.hf import LMFusionForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = export_fused(copy.deepcopy(fused_x0), tok, tmp_path / "x0_export", bos=1, eos=2)
    loaded = LMFusionForCausalLM.from_pretrained(out).model.eval()
    assert loaded.cfg.prediction_type == "sample" and loaded.cfg.image_position == "learned"
    assert torch.equal(loaded.image_tokenizer.embedder.position, fused_x0.image_tokenizer.embedder.position)
    check_same_denoising_step(fused_x0, loaded, seed=4)


@pytest.mark.parametrize("which", ["fused_blocks", "fused_context"])
def test_export_of_patcher_layers_loads_back(which, request, tmp_path, tiny_llama):
    """Both sides' image-only blocks (and the prompt vector's projection) survive the
    export: the loaded model's denoising step equals the source model's."""
    from megafusion.export import export_fused
    from megafusion.model.hf import LMFusionForCausalLM

    model = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = export_fused(copy.deepcopy(model), tok, tmp_path / "blocks_export", bos=1, eos=2)
    loaded = LMFusionForCausalLM.from_pretrained(out).model.eval()
    assert loaded.cfg.patcher_layers == 1
    assert loaded.cfg.prompt_context == model.cfg.prompt_context
    check_same_denoising_step(model, loaded, seed=5)


def check_same_denoising_step(source, loaded, seed):
    """The loaded model's cached denoising step (a velocity or noise) equals the source's."""
    prompt = [[1] + ids(5, seed + 4) + [source.boi_id]]
    x_t = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([600.0])
    with torch.no_grad():
        ref = tasks.cached_denoiser(source, inf.prefill(source, prompt)[0])(x_t, t)
        got = tasks.cached_denoiser(loaded, inf.prefill(loaded, prompt)[0])(x_t, t)
    assert ref.abs().max() > 0.1
    assert (got - ref).abs().max().item() <= TOL


def test_python_api_on_an_exported_model(exported, fused, base):
    gen = G.load(exported)
    assert (gen.bos, gen.eos, gen.boi, gen.eoi, gen.steps) == (1, 2, fused.boi_id, fused.eoi_id, 3)
    images = G.generate_image(gen, ["a red circle", "a blue square"], n=2, progress=False, seed=4)
    assert len(images) == 4 and images[0].size == (SIZE, SIZE)
    latents = G.generate_image(gen, ["a red circle"], progress=False, seed=4, return_latents=True)
    ref = tasks.text_to_image(fused, [gen.tokenize("a red circle")], bos=1, boi=fused.boi_id, steps=3,
                            guidance_scale=3.0, generator=torch.Generator().manual_seed(4))
    scale = max(1.0, ref.abs().max().item())
    assert (latents - ref).abs().max().item() <= TOL * scale
    assert len(G.caption(gen, images[:2], max_new_tokens=3)) == 2
    assert len(G.generate_image(gen, "x", cfg=1.0, steps=2, progress=False)) == 1  # no guidance: no second row
    text_ids = G.generate_text(gen, ["The capital of France is"], max_new_tokens=6, return_ids=True)[0]
    prompt = [1] + gen.tokenize("The capital of France is")
    ref = base.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    ref = ref[0, len(prompt):].tolist()
    assert text_ids == (ref[:ref.index(2)] if 2 in ref else ref)


@pytest.mark.parametrize("source", ["export", "checkpoint"])
def test_load_in_bf16_casts_parameters_and_keeps_fp32_buffers(source, exported, fused, tiny_llama, tmp_path,
                                                               monkeypatch):
    """dtype=bf16: every parameter bf16, every buffer that was fp32 still fp32 with the
    same values (RoPE's inv_freq in bf16 would put the angle at position 4095 off by
    radians). The checkpoint's reading is stubbed (the round trip in
    tests/tools/test_convert_to_hf.py reads a real one); the cast is what is tested."""
    import megafusion.checkpoint_reader as E
    from megafusion.config import load_config

    if source == "export":
        path = exported
    else:
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.base={tiny_llama}"])
        monkeypatch.setattr(E, "find_checkpoint", lambda p, tag=None: None)
        monkeypatch.setattr(E, "load_checkpoint_model", lambda p, tag=None: (copy.deepcopy(fused), cfg, None))
        path = tmp_path
    fp32_buffers = {n: b for n, b in fused.named_buffers() if b.dtype == torch.float32}
    assert "rotary_emb.inv_freq" in fp32_buffers
    model = G.load(path, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    for name, ref in fp32_buffers.items():
        assert buffers[name].dtype == torch.float32 and torch.equal(buffers[name], ref), name


def run_cli(*args, capsys):
    code = G.main([str(a) for a in args])
    c = capsys.readouterr()
    return code, c.out, c.err


def test_command_line(exported, tmp_path, capsys):
    # The real command line once (a fresh process, progress bar over the denoising steps).
    out = tmp_path / "grid.png"
    p = subprocess.run([sys.executable, str(REPO / "tools" / "generate.py"), "--model", str(exported), "image",
                        "--prompt", "a red circle", "--steps", "3", "--n", "4", "--seed", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "denoise" in p.stderr
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (2 * SIZE, 2 * SIZE)  # a 2x2 grid
    code, stdout, _ = run_cli("--model", exported, "caption", "--image", out, "--max-new-tokens", "3", capsys=capsys)
    assert code == 0 and len(stdout.strip().splitlines()) <= 1
    code, stdout, _ = run_cli("--model", exported, "text", "--prompt", "Hello", "--max-new-tokens", "4", capsys=capsys)
    assert code == 0
    md = tmp_path / "story" / "story.md"
    code, stdout, _ = run_cli("--model", exported, "--no-progress", "interleave", "--prompt", "Once", "--max-new-tokens",
                              "3", "--out", md, capsys=capsys)
    assert code == 0 and md.read_text().startswith("**Once**")


def test_interleaved_output_file(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 4), (255, 0, 0))
    md = G.write_interleaved("p", ["a <b>", img, "c"], tmp_path / "o.md")
    assert "![image 0](o_0.png)" in md.read_text() and (tmp_path / "o_0.png").is_file()
    page = G.write_interleaved("p", ["a <b>", img], tmp_path / "o.html")
    assert '<img src="o_0.png"' in page.read_text() and "a &lt;b&gt;" in page.read_text()


@pytest.mark.parametrize("args,expect", [
    (["--model", "/nonexistent/model", "text", "--prompt", "x"], "/nonexistent/model"),
    (["--model", "{tmp}", "text", "--prompt", "x"], "not an exported model"),
    (["--model", "{export}", "caption", "--image", "/nonexistent.png"], "/nonexistent.png"),
    (["--model", "{export}", "caption", "--image", "{notimage}"], "not a readable image"),
    (["--model", "{export}", "image", "--prompt", "x", "--out", "{tmp}/x.jpg"], ".png"),
    (["--model", "{export}", "image", "--prompt", "x", "--steps", "5000", "--out", "{tmp}/x.png"], "5000"),
    # interleave samples images too: its steps are checked before the model writes any
    # text (they used to be found out only once it emitted BOI)
    (["--model", "{export}", "interleave", "--prompt", "x", "--steps", "5000", "--out", "{tmp}/x.md"], "--steps 5000"),
])
def test_command_line_refusals(args, expect, exported, tmp_path, capsys):
    (tmp_path / "notimage.png").write_text("not a png")
    args = [a.format(tmp=tmp_path, export=exported, notimage=tmp_path / "notimage.png") for a in args]
    code, _, err = run_cli(*args, capsys=capsys)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code != 0 and len(errors) == 1 and expect in errors[0], err


@pytest.mark.parametrize("args,expect", [
    (["text", "--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p 0.0"),
    (["text", "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5"),
    (["text", "--prompt", "x", "--top-p", "nan"], "--top-p nan"),
    (["text", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0"),
    (["text", "--prompt", "x", "--temperature", "inf"], "--temperature inf"),
    (["caption", "--image", "{image}", "--temperature", "1", "--top-p", "0"], "--top-p 0.0"),
    (["interleave", "--prompt", "x", "--top-p", "0", "--out", "{tmp}/x.md"], "--top-p 0.0"),
    (["interleave", "--prompt", "x", "--steps", "0", "--out", "{tmp}/x.md"], "--steps 0"),
    (["image", "--prompt", "x", "--steps", "-2", "--out", "{tmp}/x.png"], "--steps -2"),
    (["image", "--prompt", "x", "--n", "0", "--out", "{tmp}/x.png"], "--n 0"),
    (["--device", "bogus", "text", "--prompt", "x"], "--device bogus"),
    (["--device", "cuda:99", "text", "--prompt", "x"], "--device cuda:99"),
])
def test_bad_numbers_are_refused_before_the_model_is_loaded(args, expect, tmp_path, capsys, monkeypatch):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "im.png")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(G, "load", no_load)
    args = [a.format(tmp=tmp_path, image=tmp_path / "im.png") for a in args]
    code, _, err = run_cli("--model", tmp_path, *args, capsys=capsys)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expect in errors[0], err
    assert "Traceback" not in err


def test_python_api_refuses_bad_numbers(exported):
    gen = G.load(exported)
    with pytest.raises(G.GenerateError, match="--top-p 0"):
        G.generate_text(gen, ["x"], temperature=1.0, top_p=0.0)
    with pytest.raises(G.GenerateError, match="--temperature -0.5"):
        G.caption(gen, [torch.zeros(3, SIZE, SIZE)], temperature=-0.5)
    for steps in (0, 5000):
        # the model is steered to emit BOI first: the image would be sampled at once
        with pytest.raises(G.GenerateError, match=f"--steps {steps}"):
            G.interleave(gen, "x", steps=steps, progress=False,
                         logits_processor=lambda new, logits: torch.where(
                             torch.arange(logits.shape[-1]) == gen.boi, 0.0, -1e4).expand_as(logits))


def test_caption_min_new_tokens_keeps_eos_out_of_the_first_steps(fused):
    """With EOS set to the token greedy decoding would pick first, min_new_tokens=1 must
    give the training forward's best other token, and min_new_tokens=0 an empty caption."""
    boi, eoi = fused.boi_id, fused.eoi_id
    img = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(41)) * 2 - 1
    doc = [TextSegment([1, boi]), ImageSegment(img[0], timestep=0.0, is_condition=True), TextSegment([eoi])]
    logits = training_forward(fused, [doc]).logits[0, -1].clone()
    logits[[boi, eoi]] = float("-inf")
    first = int(logits.argmax())
    logits[first] = float("-inf")
    second = int(logits.argmax())
    assert tasks.image_to_text(fused, img, bos=1, boi=boi, eoi=eoi, eos=first, max_new_tokens=2) == [[]]
    got = tasks.image_to_text(fused, img, bos=1, boi=boi, eoi=eoi, eos=first, max_new_tokens=1, min_new_tokens=1)
    assert got == [[second]]


# ------------------------------------------------------------- the X-Fusion designs

@pytest.fixture(scope="module", params=["dual_tower", "xfuse", "gated_tower", "single_tower"])
def design(request, base):
    """Each model.tower_mode besides lmfusion, its trainable weights (mix scalars and
    gate included) moved away from their start."""
    mode = request.param
    return make_fused(base, objective="rectified_flow", tower_mode=mode, train_text_tower=mode == "single_tower")


def test_design_cache_and_captioning_equal_the_training_forward(design):
    """Two-stream designs keep both blocks' keys and values in one cache entry per layer;
    a wrong split or a stream left out of the cache shows here."""
    model = design
    boi, eoi = model.boi_id, model.eoi_id
    x0 = check_cached_denoising_step(model, seed=70)
    img = x0[None]
    got = tasks.image_to_text(model, img, bos=1, boi=boi, eoi=eoi, eos=-1, max_new_tokens=3)[0]
    new = []
    for _ in range(3):
        doc = [TextSegment([1, boi]), ImageSegment(x0, timestep=0.0, is_condition=True), TextSegment([eoi] + new)]
        step = training_forward(model, [doc]).logits[0, -1].clone()
        step[[boi, eoi]] = float("-inf")
        new.append(int(step.argmax()))
    assert got == new


def test_design_cached_sampling_equals_uncached(design):
    """Guided sampling with the prompt cache (both streams' keys and values in one entry)
    equals sampling without it, in float64 (see test_cached_sampling_equals_uncached)."""
    check_cached_sampling(design)


def test_design_exports_and_its_hf_text_path_is_the_bases(design, base, tiny_llama, tmp_path):
    from megafusion.export import export_fused
    from megafusion.model.hf import LMFusionForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = export_fused(copy.deepcopy(design), tok, tmp_path / "export", bos=1, eos=2)
    hf = LMFusionForCausalLM.from_pretrained(out).eval()
    loaded = hf.model
    assert loaded.cfg.tower_mode == design.cfg.tower_mode
    check_same_denoising_step(design, loaded, seed=73)
    if design.cfg.tower_mode == "single_tower":
        return  # its text path is trained (perturbed here): not the base's
    x = torch.tensor([[1] + ids(7, 74)])
    with torch.no_grad():
        out_ids = hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                              suppress_tokens=[design.boi_id, design.eoi_id])
        ref_ids = base.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out_ids.tolist() == ref_ids.tolist()
