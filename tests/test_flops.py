"""megafusion.flops against torch's FlopCounterMode on real training steps (the
matmuls autograd actually runs, frozen weights included) and against closed-form pair
counts."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
from megafusion.model.config import FusionConfig
from megafusion.flops import (
    attention_pairs,
    attention_pairs_packed,
    causal_pairs,
    layer_matmul_params,
    linear_patcher_flops,
    train_step_flops,
)
from megafusion.model.fusion import LMFusionModel

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True, attn_implementation="sdpa")
MATMULS = ("aten.mm", "aten.addmm")  # linear layers; attention runs as sdpa or bmm


def counted(fn, modules: list[str]) -> dict[str, int]:
    """FLOPs of the linear layers inside each named module during fn() (forward and
    backward), as torch's FlopCounterMode attributes them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()
    return {m: sum(v for op, v in counts.get(m, {}).items() if str(op) in MATMULS) for m in modules}


def llama(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG).float()


def test_layer_params_closed_form():
    # q 64x64, k and v 64x32 (2 of 4 heads' worth), o 64x64, gate/up/down 3 x 64x96.
    assert layer_matmul_params(CONFIG) == 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    layer = llama().model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert layer_matmul_params(CONFIG) == weights


def test_dense_step_matches_flop_counter():
    model = llama()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    names = [f"LlamaForCausalLM.model.layers.{i}" for i in range(CONFIG.num_hidden_layers)] + ["LlamaForCausalLM.lm_head"]
    got = counted(lambda: model(input_ids=ids, labels=ids).loss.backward(), names)
    want = train_step_flops(CONFIG, text_tokens=80, logit_tokens=80, attention_pairs=causal_pairs(2, 40))
    assert sum(got[n] for n in names[:-1]) == want["layers"]
    assert got["LlamaForCausalLM.lm_head"] == want["lm_head"]
    assert want["attention"] == 12 * 2 * 4 * 16 * (2 * 40 * 41 // 2)


def fused_batch():
    g = torch.Generator().manual_seed(0)
    text = lambda n: TextSegment(torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist())
    image = lambda: ImageSegment(torch.rand(3, 8, 8, generator=g) * 2 - 1, timestep=500.0)
    doc = [text(10), image(), text(7)]
    # Two documents (33 tokens each) and 14 padding tokens; 16 tokens per image.
    return PackedBatch.from_rows([[doc, [text(5), image(), text(3)]]], seq_len=80, tokens_per_image=16,
                                 images_are_latents=False)


def fused_step_setup(fcfg):
    """The fused model on fused_batch(): (model, batch, (text, image, target) token counts,
    the FlopCounterMode names of its decoder layers and LM head)."""
    torch.manual_seed(0)
    model = LMFusionModel(llama(), fcfg).train()
    batch = fused_batch()
    n_image = int((batch.modality == 1).sum())
    counts = (batch.modality.numel() - n_image, n_image, int((model.lm_targets(batch) != -100).sum()))
    names = [f"LMFusionModel.layers.{i}" for i in range(CONFIG.num_hidden_layers)] + ["LMFusionModel.lm_head"]
    return model, batch, counts, names


def test_fused_step_counts_the_frozen_tower_as_4n():
    """With the text tower frozen autograd skips its weight gradients: text tokens cost
    4 x weights, image tokens 6 x, and the frozen LM head 4 x at text targets only. With
    the text tower trainable, text tokens cost 6 x again."""
    fcfg = FusionConfig(image_mode="pixel", image_size=8, patch_size=2, patcher="linear", attention_backend="sdpa")
    model, batch, (n_text, n_image, n_targets), names = fused_step_setup(fcfg)
    assert (n_text, n_image, n_targets) == (48, 32, 9 + 6 + 4 + 2)
    for frozen in (True, False):
        model.set_text_tower_trainable(not frozen)
        model.zero_grad(set_to_none=True)
        got = counted(lambda: model(batch).loss.backward(), names)
        want = train_step_flops(CONFIG, text_tokens=n_text, image_tokens=n_image, logit_tokens=n_targets,
                                attention_pairs=0, frozen_text=frozen)
        assert sum(got[n] for n in names[:-1]) == want["layers"], frozen
        assert got["LMFusionModel.lm_head"] == want["lm_head"], frozen
    # The patcher: Linear(3*2*2 -> 64) in (no input gradient: its input is the noisy
    # image), Linear(64 -> 12) out.
    io = counted(lambda: model(batch).loss.backward(),
                 ["LMFusionModel.image_tokenizer.embedder.proj", "LMFusionModel.image_tokenizer.predictor.proj"])
    assert sum(io.values()) == linear_patcher_flops(12, 64, n_image) == (4 + 6) * 12 * 64 * n_image


def sdpa_pairs(model, batch, monkeypatch) -> int:
    """(query head, key) pairs handed to scaled_dot_product_attention in one forward."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        seen.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(batch)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real)
    return sum(seen)


@pytest.mark.parametrize("mode", ["dual_tower", "xfuse", "gated_tower", "single_tower"])
def test_each_design_step_matches_flop_counter(mode, monkeypatch):
    """The X-Fusion designs' training steps, frozen text tower (single_tower: trainable),
    against FlopCounterMode for the linear layers, and the attention term's factor
    against the pairs the designs hand to SDPA next to lmfusion's."""
    fcfg = FusionConfig(image_mode="pixel", image_size=8, patch_size=2, patcher="linear", attention_backend="sdpa",
                        tower_mode=mode, train_text_tower=mode == "single_tower")
    model, batch, (n_text, n_image, n_targets), names = fused_step_setup(fcfg)
    got = counted(lambda: model(batch).loss.backward(), names)
    want = train_step_flops(CONFIG, text_tokens=n_text, image_tokens=n_image, logit_tokens=n_targets,
                            attention_pairs=0, frozen_text=mode != "single_tower", tower_mode=mode)
    assert sum(got[n] for n in names[:-1]) == want["layers"]
    assert got["LMFusionModel.lm_head"] == want["lm_head"]
    one = train_step_flops(CONFIG, text_tokens=0, logit_tokens=0, attention_pairs=100)["attention"]
    this = train_step_flops(CONFIG, text_tokens=0, logit_tokens=0, attention_pairs=100, tower_mode=mode)["attention"]
    torch.manual_seed(0)
    lmfusion = LMFusionModel(llama(), FusionConfig(image_mode="pixel", image_size=8, patch_size=2, patcher="linear",
                                                   attention_backend="sdpa"))
    assert this * sdpa_pairs(lmfusion, batch, monkeypatch) == one * sdpa_pairs(model, batch, monkeypatch)


def test_attention_term_is_what_naive_attention_computes():
    """Naive attention computes every pair (a mask does not skip work), so with all pairs
    allowed its forward + backward matmuls equal the formula's attention term."""
    B, Hq, Hkv, L, d = 2, 4, 2, 24, 16
    q = torch.randn(B, Hq, L, d, requires_grad=True)
    k = torch.randn(B, Hkv, L, d, requires_grad=True)
    v = torch.randn(B, Hkv, L, d, requires_grad=True)

    def step():
        kk, vv = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        out = (q @ kk.transpose(-1, -2) / d ** 0.5).softmax(-1) @ vv
        out.sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    one_layer = LlamaConfig(hidden_size=Hq * d, num_attention_heads=Hq, num_key_value_heads=Hkv, num_hidden_layers=1,
                            intermediate_size=8, vocab_size=8)
    assert counter.get_total_flops() == train_step_flops(one_layer, text_tokens=0, logit_tokens=0,
                                                         attention_pairs=B * L * L)["attention"]


def test_attention_pairs_closed_form():
    # Row 0: document of text 3, image 4, text 2 (9 tokens), then 5 padding tokens.
    # Row 1: text 6, then a document that is one image of 8 tokens.
    batch = PackedBatch.from_rows(
        [[[TextSegment([1, 2, 3]), ImageSegment(torch.zeros(1)), TextSegment([4, 5])]],
         [[TextSegment([1] * 6)], [ImageSegment(torch.zeros(1)), ImageSegment(torch.zeros(1))]]],
        seq_len=14, tokens_per_image=4)
    tri = lambda n: n * (n + 1) // 2
    # An image of n tokens adds the n(n-1)/2 pairs above the diagonal to causal attention.
    image = lambda n: n * (n - 1) // 2
    row0 = tri(9) + image(4) + tri(5)
    row1 = tri(6) + tri(8) + 2 * image(4)
    assert attention_pairs(batch.document_ids, batch.image_ids) == row0 + row1
    text_only = torch.zeros(3, 10, dtype=torch.long)
    assert attention_pairs(text_only, text_only - 1) == causal_pairs(3, 10) == 3 * 55


def test_packed_attention_pairs_equal_the_mask_count():
    """The trainer's O(tokens) count against the brute-force hybrid mask, on the closed-
    form rows above and on random packings (documents of text and images, padding)."""
    gen = torch.Generator().manual_seed(0)
    rows = [[[TextSegment([1, 2, 3]), ImageSegment(torch.zeros(1)), TextSegment([4, 5])]],
            [[TextSegment([1] * 6)], [ImageSegment(torch.zeros(1)), ImageSegment(torch.zeros(1))]]]
    for _ in range(20):
        row = []
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            doc = [ImageSegment(torch.zeros(1)) if torch.rand((), generator=gen) < 0.5
                   else TextSegment([1] * int(torch.randint(1, 6, (), generator=gen)))
                   for _ in range(int(torch.randint(1, 4, (), generator=gen)))]
            row.append(doc)
        rows.append(row)
    batch = PackedBatch.from_rows(rows, seq_len=48, tokens_per_image=4)
    assert attention_pairs_packed(batch.document_ids, batch.image_ids) == attention_pairs(batch.document_ids,
                                                                                         batch.image_ids)


def test_trainer_counts_a_batch_as_the_flop_counter_does():
    """The trainer's per-batch model FLOPs (its MFU numerator) against FlopCounterMode on
    the same batch: every matmul of the layers, the LM head and the patcher as autograd
    runs them with the text tower frozen, plus attention over the brute-force mask's pairs
    (SDPA with an explicit mask computes all pairs; model FLOPs count the allowed ones)."""
    from types import SimpleNamespace

    from megafusion.parallel.step_log import StepLog

    fcfg = FusionConfig(image_mode="pixel", image_size=8, patch_size=2, patcher="linear", attention_backend="sdpa")
    torch.manual_seed(0)
    model = LMFusionModel(llama(), fcfg).train()
    batch = fused_batch()
    names = [f"LMFusionModel.layers.{i}" for i in range(CONFIG.num_hidden_layers)] + [
        "LMFusionModel.lm_head", "LMFusionModel.image_tokenizer.embedder.proj",
        "LMFusionModel.image_tokenizer.predictor.proj"]
    got = counted(lambda: model(batch).loss.backward(), names)
    head_dim = CONFIG.hidden_size // CONFIG.num_attention_heads
    want = sum(got.values()) + 12 * CONFIG.num_hidden_layers * CONFIG.num_attention_heads * head_dim * attention_pairs(
        batch.document_ids, batch.image_ids)
    stub = SimpleNamespace(model=model, cfg=SimpleNamespace(model=SimpleNamespace(train_text_tower=False)),
                           _patcher_flops=None)
    # The in-projection has no input gradient (4x, not the generic 6x of a patch
    # projection): within 2% of the whole step here, ~0 at Llama scale.
    assert StepLog.batch_flops(stub, batch) == pytest.approx(want, rel=0.02)
