"""LLaVAFusion's data (issue 15): with a LLaVA base the same image-caption shards give
generation rows for the new image tower and understanding rows that take the VLM's own
path. Reference: the base VLM in plain transformers, run on the shard row's image and
caption through its own processor."""
import io

import torch
from mf_data_helpers import SINGLE
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from megafusion.data import build_train_loader
from megafusion.model.batch import ImageSegment, PackedBatch, VLMImageSegment
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import load_tokenizer


def fusion_cfg(base) -> FusionConfig:
    return FusionConfig(base=base, image_mode="pixel", image_size=16, patch_size=4, patcher="linear",
                        attention_backend="sdpa")


def test_understanding_rows_read_as_the_base_vlm_reads_them(tiny_llava, synthetic_dir, make_cfg):
    fusion = fusion_cfg(tiny_llava)
    model = LMFusionModel.from_base(tiny_llava, fusion).eval()
    tokenizer = load_tokenizer(tiny_llava)
    cfg = make_cfg(synthetic_dir, seq_len=512, batch_size=1, samples_per_step=6, generation_ratio=0.5)
    loader = build_train_loader(cfg, fusion, tokenizer, model.tokens_per_image, SINGLE, vocab_size=model.vocab_size)

    # The loader's batches hold both kinds, and every placeholder has its features.
    batch = next(iter(loader))
    n_placeholders = int((batch.input_ids == model.understanding.image_token_id).sum())
    assert batch.num_images >= 1 and batch.vlm_pixel_values is not None and n_placeholders > 0
    with torch.no_grad():
        assert model.understanding(batch.vlm_pixel_values, batch.vlm_image_sizes).shape[0] == n_placeholders

    # One understanding row and one generation row, packed together: the understanding
    # document's logits are the VLM's on that row's image and caption.
    builder, dataset = loader.dataset.builder, loader.dataset
    kinds = {}
    for i in range(64):
        docs = builder(dataset.get_item(i), i, 0)["docs"]
        kind = "vlm" if any(isinstance(s, VLMImageSegment) for s in docs[0]) else "gen"
        assert kind == "vlm" or any(isinstance(s, ImageSegment) for s in docs[0])
        kinds.setdefault(kind, (i, docs[0]))
    (i, und), (_, gen) = kinds["vlm"], kinds["gen"]
    row = dataset.get_item(i)
    processor = AutoProcessor.from_pretrained(tiny_llava)
    image = Image.open(io.BytesIO(row["image"])).convert("RGB")
    ref_in = processor(images=[image], text=[processor.image_token + "\n" + row["caption"]], return_tensors="pt",
                       add_special_tokens=False)
    ids = ref_in["input_ids"]
    bos, eos = builder.bos, builder.eos
    ids = torch.cat([torch.tensor([[bos]] if bos is not None else [[]], dtype=torch.long), ids,
                     torch.tensor([[eos]])], 1)
    hf = AutoModelForImageTextToText.from_pretrained(tiny_llava, dtype=torch.float32, attn_implementation="sdpa").eval()
    extra = {"image_sizes": ref_in["image_sizes"]} if "image_sizes" in ref_in else {}
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=ref_in["pixel_values"], **extra).logits[0]
        packed = PackedBatch.from_rows([[gen, und]], seq_len=512, tokens_per_image=model.tokens_per_image,
                                       image_shape=(3, 16, 16), images_are_latents=False)
        logits = model(packed, return_logits=True).logits[0]
    start = int((packed.document_ids[0] == 1).nonzero()[0])
    ours = logits[start:start + ids.shape[1], :reference.shape[-1]]
    assert torch.equal(packed.input_ids[0, start:start + ids.shape[1]], ids[0])
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0), (ours - reference).abs().max()

