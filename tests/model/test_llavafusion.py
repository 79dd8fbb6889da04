"""LLaVAFusion (issue 15): a LLaVA-family base keeps its understanding path. References:
the base VLM itself in plain transformers (its forward's logits and its generate), the
base's weights on disk, and autograd's view of which parameters learn."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment, VLMImageSegment
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.tasks import vlm_image_to_text
from megafusion.model.loading import BaseModelError, is_vlm_base, load_base_config

PROMPT = "<image>\nWhat is in the picture?"


def cfg(**kw) -> FusionConfig:
    args = dict(image_mode="pixel", image_size=16, patch_size=4, patcher="linear", attention_backend="sdpa")
    args.update(kw)
    return FusionConfig(**args)


def picture(seed: int, size=(40, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def processed(base: str, images, texts):
    processor = AutoProcessor.from_pretrained(base)
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def understanding_doc(inputs, row: int, token_id: int, caption_loss: bool = False):
    """The processor's row as megafusion segments: text, the image's placeholder run, text."""
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
    first = ids.index(token_id)
    n = ids.count(token_id)
    # One image per call here: its row of pixel_values is its own crops, unpadded.
    assert inputs["pixel_values"].shape[0] == 1
    size = tuple(int(x) for x in inputs["image_sizes"][row]) if "image_sizes" in inputs else None
    return [TextSegment(ids[:first], loss=False), VLMImageSegment(inputs["pixel_values"][row], token_id, n, size),
            TextSegment(ids[first + n:], loss=caption_loss)]


@torch.no_grad()
def test_logits_on_image_and_text_equal_the_base_vlm(tiny_llava):
    hf = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32, attn_implementation="sdpa").eval()
    model = LMFusionModel.from_base(tiny_llava, cfg()).eval()
    inputs = processed(tiny_llava, [picture(0)], [PROMPT])
    reference = hf(**inputs).logits[0]
    doc = understanding_doc(inputs, 0, hf.config.image_token_index)
    batch = PackedBatch.from_rows([[doc]], seq_len=reference.shape[0], tokens_per_image=model.tokens_per_image,
                                  image_shape=(3, 16, 16))
    ours = model(batch, return_logits=True).logits[0, :, :reference.shape[-1]]
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
    # The image matters: without it (placeholders as plain tokens) the logits move.
    plain = hf(input_ids=inputs["input_ids"]).logits[0]
    assert (plain - reference).abs().max() > 1e-3


@torch.no_grad()
def test_caption_equals_the_base_vlms_greedy_generate(tiny_llava):
    hf = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32, attn_implementation="sdpa").eval()
    model = LMFusionModel.from_base(tiny_llava, cfg()).eval()
    inputs = processed(tiny_llava, [picture(1), picture(2, (32, 32))], [PROMPT, PROMPT])
    n_new = 12
    reference = hf.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    reference = reference[:, inputs["input_ids"].shape[1]:].tolist()
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    pixels, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    ours = vlm_image_to_text(model, prompts, pixels, sizes, eos=-1, max_new_tokens=n_new,
                             banned=(model.boi_id, model.eoi_id))
    assert ours == reference


def test_training_moves_only_the_image_tower(tiny_llava):
    """A few AdamW steps on understanding (the VLM's path) and generation (the new tower)
    samples: the diffusion loss falls, the LLM, vision encoder and projector stay bitwise
    the base's, and the understanding path's logits still equal the base VLM's."""
    torch.manual_seed(0)
    model = LMFusionModel.from_base(tiny_llava, cfg())
    token_id = model.understanding.image_token_id
    inputs = processed(tiny_llava, [picture(3)], [PROMPT + " A red square."])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("understanding.vlm.vision_tower.") for n in frozen)
    assert any(n.startswith("understanding.vlm.multi_modal_projector.") for n in frozen)
    assert not any(p.requires_grad for p in model.understanding.parameters())
    caption = model_tokenize(tiny_llava, "A red square.")
    image = torch.rand(3, 16, 16) * 2 - 1
    docs = [understanding_doc(inputs, 0, token_id, caption_loss=True),
            [TextSegment(caption), TextSegment([model.boi_id]), ImageSegment(image, timestep=600.0),
             TextSegment([model.eoi_id])]]
    seq = sum(len(s.ids) if not isinstance(s, ImageSegment) else model.tokens_per_image for d in docs for s in d)
    batch = PackedBatch.from_rows([docs], seq_len=seq, tokens_per_image=model.tokens_per_image,
                                  images_are_latents=False, image_shape=(3, 16, 16))
    noise = torch.randn(1, *model.image_tokenizer.latent_shape)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(batch, noise=noise)
        out.loss.backward()
        assert all(p.grad is None for p in model.understanding.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(float(out.diffusion_loss))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # The base's own weights on disk, not only the start of this run.
    hf = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        reference = hf(**inputs).logits[0]
        model.eval()
        one = PackedBatch.from_rows([[docs[0]]], seq_len=reference.shape[0], tokens_per_image=model.tokens_per_image,
                                    image_shape=(3, 16, 16))
        ours = model(one, return_logits=True).logits[0, :, :reference.shape[-1]]
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)


def assert_understands_as_the_base(model, base: str, seed: int):
    """model's logits on an image and a prompt equal the base VLM's (fp32, within 1e-5);
    returns the base VLM."""
    hf = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa").eval()
    inputs = processed(base, [picture(seed)], [PROMPT])
    with torch.no_grad():
        reference = hf(**inputs).logits[0]
        batch = PackedBatch.from_rows([[understanding_doc(inputs, 0, hf.config.image_token_index)]],
                                      seq_len=reference.shape[0], tokens_per_image=model.tokens_per_image,
                                      image_shape=model.image_tokenizer.latent_shape)
        ours = model(batch, return_logits=True).logits[0, :, :reference.shape[-1]]
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()
    return hf


def model_tokenize(base: str, text: str) -> list[int]:
    return AutoProcessor.from_pretrained(base).tokenizer(text, add_special_tokens=False)["input_ids"]


def test_placeholders_without_pixels_are_refused(tiny_llava):
    model = LMFusionModel.from_base(tiny_llava, cfg())
    ids = [1, model.understanding.image_token_id, 5]
    batch = PackedBatch.from_rows([[[TextSegment(ids)]]], seq_len=3, tokens_per_image=model.tokens_per_image,
                                  image_shape=(3, 16, 16))
    with pytest.raises(ValueError, match="placeholder tokens .* but no pixels"):
        model(batch)


def test_base_kinds_are_detected_and_the_rest_refused(tiny_llava, tiny_llama, tmp_path):
    assert is_vlm_base(tiny_llava) and not is_vlm_base(tiny_llama)
    assert load_base_config(tiny_llava).model_type == "llama"
    other = tmp_path / "idefics"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(BaseModelError, match=r"model_type='idefics3', expected a Llama-family model .* LLaVA") as err:
        load_base_config(str(other))
    assert "\n" not in str(err.value)
    bare = tmp_path / "llava-without-processor"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_llava}/{f}", bare / f)
    with pytest.raises(BaseModelError, match="without its processor") as err:
        LMFusionModel.from_base(str(bare), cfg())
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_two_rank_zero3_run_keeps_every_frozen_weight(tiny_llava, synthetic_shards, tmp_path):
    """train.py on two CPU ranks under ZeRO-3 with understanding and generation rows (the
    LLaVA one in bf16 with zero_init and activation checkpointing, as the large configs): the
    diffusion loss falls, the run's frozen check covers the LLM, vision encoder and projector (all bitwise
    unchanged), the checkpoint holds trainable tensors only, the model rebuilt from it
    understands exactly as the base VLM on disk while its image tower has moved, and its
    export round-trips."""
    import subprocess

    from launchers import launcher_cmd, launcher_env

    from megafusion.checkpoint_reader import consolidate_zero, find_checkpoint, load_checkpoint_model
    from megafusion.export import export_checkpoint

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    cmd = [*launcher_cmd(2), str(repo / "megafusion/train.py"), "--config", str(repo / "configs/tiny.yaml"),
           f"model.base={tiny_llava}", f"run.dir={run_dir}", f"data.train={synthetic_shards}",
           f"data.run_id=vlm-{tmp_path.name}", "train.steps=3", "log.tensorboard=false", "data.generation_ratio=0.5",
           "log.sample_every=3"]
    if "next" not in tiny_llava:  # the large configs' settings, a CPU stand-in for the GPU path
        cmd += ["train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true"]
    p = subprocess.run(cmd, cwd=repo, env=launcher_env(2), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    from megafusion.checkpoint_reader import load_run_config

    ref = find_checkpoint(run_dir)
    start = LMFusionModel.from_base(tiny_llava, load_run_config(ref).model)  # copies of the base where not random
    n_frozen = sum(1 for q in start.parameters() if not q.requires_grad)
    n_vision = sum(1 for _ in start.understanding.parameters())
    assert f"frozen check: {n_frozen} frozen tensors on rank 0 bitwise unchanged" in out, out[-3000:]
    assert n_vision > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["diffusion_loss"] < rows[0]["diffusion_loss"], rows
    # The sample point ran on both ranks (ZeRO-3 gathers the vision encoder for captions too).
    assert (run_dir / "samples" / "step_0000003.png").is_file() and (run_dir / "samples" / "step_0000003.txt").is_file()

    stored = consolidate_zero(ref)
    trainable = {n for n, q in start.named_parameters() if q.requires_grad}
    assert set(stored) <= trainable and not any(n.startswith("understanding.") for n in stored)

    model, _, _ = load_checkpoint_model(run_dir)
    # The image tower's decoder layers start as copies of the base's (deterministic), so
    # a change there is training, not another random initialisation.
    initial = dict(start.named_parameters())
    copied = [n for n in trainable if n.startswith("layers.") and ".image." in n]
    moved = [n for n, q in model.named_parameters() if n in copied and not torch.equal(q, initial[n])]
    assert copied and moved, "training changed no image-tower weight"
    hf = assert_understands_as_the_base(model, tiny_llava, seed=4)
    # Sampling from the checkpoint captions through the VLM's path: the base's own
    # greedy output on the same layout ([BOS], the image, a newline).
    from megafusion.generate import load

    gen = load(run_dir)
    assert gen.processor is not None
    image, n = picture(5), 8
    text = gen.caption([image], max_new_tokens=n, min_new_tokens=n)
    proc = AutoProcessor.from_pretrained(tiny_llava)
    ref_in = proc(images=[image], text=[proc.image_token + "\n"], return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([torch.tensor([[gen.bos]]), ref_in["input_ids"]], 1) if gen.bos is not None else ref_in["input_ids"]
    extra = {"image_sizes": ref_in["image_sizes"]} if "image_sizes" in ref_in else {}
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ref_in["pixel_values"],
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=gen.eos, **extra)
    assert text == [gen.detokenize(out[0, ids.shape[1]:].tolist())]
    # The export (tools/convert_to_hf.py's code) round-trips: loaded with transformers'
    # remote code, it holds the checkpoint's image tower exactly (fp32), the base's vision
    # parts, and captions as the base VLM.
    from transformers import AutoModelForCausalLM

    export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    assert type(exported).__module__.startswith("transformers_modules")
    ours_state = {f"model.{n}": t for n, t in model.state_dict().items() if ".vae." not in n}
    theirs = exported.state_dict()
    assert set(ours_state) == set(theirs)
    for name, t in ours_state.items():
        assert torch.equal(theirs[name], t), name
    proc_out = AutoProcessor.from_pretrained(str(tmp_path / "hf"))(images=[image], text=[proc.image_token + "\n"],
                                                                    return_tensors="pt", add_special_tokens=False)
    assert torch.equal(proc_out["input_ids"], ref_in["input_ids"])
    rows = [ids[0].tolist()]
    new = exported.caption_with_vlm(rows, proc_out["pixel_values"], proc_out.get("image_sizes"), max_new_tokens=n,
                                    min_new_tokens=n)
    assert new == [out[0, ids.shape[1]:].tolist()]


@pytest.mark.parametrize("layout", ["saved", "prefixed"])
def test_base_weights_find_every_tensor_in_either_vlm_layout(tiny_llava, tmp_path, layout):
    """The streamed export reads a LLaVA base by key. transformers 4.57 saves the legacy
    layout (language_model.model.*, vision_tower.*); newer versions save model.language_model.*,
    model.vision_tower.* (the in-memory names). Every tensor of the fused model's frozen
    parts must be found, and equal to what transformers itself loads, in both."""
    from safetensors.torch import load_file, save_file

    from megafusion.model.vlm import split_vlm
    from megafusion.parallel.base_weights import UNDERSTANDING, BaseWeights

    base = tmp_path / "base"
    shutil.copytree(tiny_llava, base)
    if layout == "prefixed":
        state = load_file(str(base / "model.safetensors"))

        def new_key(key):
            if key.startswith("language_model.model."):
                return "model.language_model." + key[len("language_model.model."):]
            if key == "language_model.lm_head.weight":
                return "lm_head.weight"
            return "model." + key

        save_file({new_key(k): v for k, v in state.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
        assert not any(k.startswith("language_model.") for k in load_file(str(base / "model.safetensors")))
    hf = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    text, understanding = split_vlm(hf)
    weights = BaseWeights(str(base))
    wanted = {n: p for n, p in text.named_parameters()}
    wanted.update({UNDERSTANDING + n: p for n, p in understanding.vlm.named_parameters()})
    assert len(wanted) == len(weights.file_of)  # every tensor on disk has one name
    for name, p in wanted.items():
        assert torch.equal(weights.get(name), p), name


def test_pipeline_stages_compute_the_whole_models_losses(tiny_llava):
    """Pipeline stages on a LLaVA base (the understanding path on the first stage, its
    weights read from the base by key): the head stage's (total, lm, diffusion) equal the
    single-process model's on a batch of generation, image-tower understanding and VLM
    understanding documents with the same noise draw, and the VLM's parts stay frozen."""
    from pathlib import Path

    from megafusion.config import load_config
    from megafusion.model.loading import load_base
    from megafusion.parallel.pipeline import DecoderStage, EmbedStage, HeadStage, StageSource, batch_to_inputs

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"model.base={tiny_llava}", "model.objective=rectified_flow"])
    torch.manual_seed(cfg.run.seed)
    source = StageSource(cfg)
    stages = [EmbedStage(source)] + [DecoderStage(source, i) for i in range(2)] + [HeadStage(source)]
    torch.manual_seed(cfg.run.seed)
    text, und = load_base(tiny_llava)
    whole = LMFusionModel(text, cfg.model, understanding=und)
    with torch.no_grad():  # a predictor that is not zero, so the diffusion loss depends on the stages' work
        for proj in (whole.image_tokenizer.predictor.proj, stages[-1].predictor.proj):
            proj.weight.copy_(torch.linspace(-0.05, 0.05, proj.weight.numel()).view_as(proj.weight))

    g = torch.Generator().manual_seed(0)
    T, shape = whole.tokens_per_image, whole.image_tokenizer.latent_shape
    pixels = lambda: torch.rand(*shape, generator=g) * 2 - 1
    txt = lambda n: TextSegment(torch.randint(3, 300, (n,), generator=g).tolist())
    boi, eoi = TextSegment([whole.boi_id]), TextSegment([whole.eoi_id])
    inputs = processed(tiny_llava, [picture(6)], [PROMPT])
    vlm_doc = understanding_doc(inputs, 0, und.image_token_id, caption_loss=True) + [txt(4)]
    rows = [[[txt(5), boi, ImageSegment(pixels(), timestep=700.0), eoi], vlm_doc],
            [[boi, ImageSegment(pixels(), is_condition=True), eoi, txt(6)]]]
    batch = PackedBatch.from_rows(rows, seq_len=2 * T + inputs["input_ids"].shape[1] + 20, tokens_per_image=T,
                                  images_are_latents=False)
    assert batch.vlm_pixel_values is not None
    torch.manual_seed(3)
    x = batch_to_inputs(batch)
    for stage in stages:
        x = stage(x)
    x[0].backward()
    torch.manual_seed(3)
    with torch.no_grad():
        ref = whole(batch)
    torch.testing.assert_close(x[2], ref.diffusion_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[1], ref.lm_loss.float(), rtol=1e-5, atol=1e-6)
    first = stages[0]
    assert first.understanding is not None and not any(p.requires_grad for p in first.understanding.parameters())
    assert all(p.grad is None for p in first.understanding.parameters())


@pytest.mark.slow
def test_two_pipeline_stages_train_and_export(tiny_llava_only, synthetic_shards, tmp_path):
    """train.py with two pipeline stages (+ ZeRO-1) on a LLaVA base: the first stage
    holds the understanding path; the frozen check covers it; the pipeline checkpoint's
    export understands as the base VLM and holds the trained image tower of
    load_checkpoint_model's model (the same checkpoint read another way)."""
    import subprocess

    from launchers import launcher_cmd, launcher_env

    from megafusion.checkpoint_reader import load_checkpoint_model
    from megafusion.export import export_checkpoint
    base = tiny_llava_only
    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    cmd = [*launcher_cmd(2), str(repo / "megafusion/train.py"), "--config", str(repo / "configs/tiny.yaml"),
           f"model.base={base}", f"run.dir={run_dir}", f"data.train={synthetic_shards}",
           f"data.run_id=vlmpipe-{tmp_path.name}", "train.steps=2", "log.tensorboard=false", "data.generation_ratio=0.5",
           "parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json"]
    p = subprocess.run(cmd, cwd=repo, env=launcher_env(2), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "frozen check:" in out and "bitwise unchanged" in out

    model, _, _ = load_checkpoint_model(run_dir)
    export_checkpoint(run_dir, tmp_path / "hf", dtype="fp32")
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    theirs = exported.state_dict()
    for name, t in model.state_dict().items():
        if ".vae." not in name:
            assert torch.equal(theirs[f"model.{name}"], t), name
    assert_understands_as_the_base(exported.model, base, seed=7)
