"""Tiny models and data for the evaluation tests (tests/eval/conftest.py,
tests/tools/test_evaluate.py and tests/parallel/test_sampling_shapes.py import these): the
tiny random Llama fused with a perturbed image tower, as tests/test_generate.py builds it,
and its export; small held-out synthetic shards; tiny randomly initialised feature
extractors saved to disk."""
from __future__ import annotations

import copy
import json

import pytest
import torch

SIZE, PATCH = 16, 4  # 16 image tokens per image: a few denoising steps take well under a second


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_fused(base_dir, **kw):
    from transformers import LlamaForCausalLM

    from megafusion.model.config import FusionConfig
    from megafusion.model.fusion import LMFusionModel

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    args = dict(base=str(base_dir), image_mode="pixel", image_size=SIZE, patch_size=PATCH, patcher="linear",
                attention_backend="sdpa")
    args.update(kw)
    return perturb(LMFusionModel(base, FusionConfig(**args))).eval()


def export(fused, base_dir, out):
    from transformers import AutoTokenizer

    from megafusion.export import export_fused

    tok = AutoTokenizer.from_pretrained(base_dir)
    return export_fused(copy.deepcopy(fused), tok, out, bos=1, eos=2, generation_defaults={"image_num_inference_steps": 2})


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_llama):
    return export(make_fused(tiny_llama), tiny_llama, tmp_path_factory.mktemp("eval_export") / "tiny_export")


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory) -> str:
    """16 held-out synthetic rows at 32x32 (image, caption, id, meta), as prepare_data writes them."""
    from megafusion.data.prepare import write_synthetic

    out = tmp_path_factory.mktemp("eval_data") / "val"
    write_synthetic(str(out), 16, 32, seed=0, split="val")
    return str(out)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> str:
    """torch-fidelity's FID InceptionV3 architecture with random weights, saved as the
    state-dict file a real pt_inception-2015-12-05 download is (built without its
    download: the loading is stubbed during construction only)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    out = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    finally:
        mp.undo()
    torch.save(net.state_dict(), out)
    return str(out)


def _byte_level_vocab() -> dict:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return vocab


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIPModel with a character-level CLIP tokenizer (byte-level BPE
    without merges) and a 32x32 image processor, saved as a local model directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip") / "tiny_clip"
    src = out.parent / "tok_src"
    src.mkdir()
    vocab = _byte_level_vocab()
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(out)
    return str(out)
