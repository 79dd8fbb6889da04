"""model.prompt_context: the output side's image-only blocks read each image's prompt
vector, the text tower's final-norm hidden state at the token just before the image.
References: a brute-force walk over the packed rows, and the base model run on each
document's prompt alone (the fused text tower is the base model)."""
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from megafusion.model.batch import IMAGE, TEXT, ImageSegment, PackedBatch, TextSegment
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.routing import Routing, prompt_vectors

SIZE, PATCH = 8, 4  # 4 tokens per image


def test_prompt_vectors_brute_force():
    """Each image's vector is the norm of the hidden state one position before its first
    token when that is text of the same row, else zeros; rows are walked by hand."""
    T, B, L, H = 2, 3, 9, 5
    rows = ["TTIITTIIT", "IITIITTTT", "TTTTIIIIT"]  # an image opening a row; one right after another
    modality = torch.tensor([[IMAGE if c == "I" else TEXT for c in r] for r in rows])
    routing = Routing.from_modality(modality)
    h_seq = torch.randn(B, L, H, generator=torch.Generator().manual_seed(0))
    norm = lambda x: 2 * x + 1  # any row-wise map; zeros must not pass through it unmasked
    expected, starts = [], []
    for b, r in enumerate(rows):
        col = 0
        while col < L:
            if r[col] == "I":
                starts.append((b, col))
                expected.append(norm(h_seq[b, col - 1]) if col > 0 and r[col - 1] == "T" else torch.zeros(H))
                col += T
            else:
                col += 1
    got = prompt_vectors(routing.to_sorted(h_seq), routing, len(expected), T, norm)
    assert torch.equal(got, torch.stack(expected))
    assert prompt_vectors(routing.to_sorted(h_seq), routing, 0, T, norm).shape == (0, H)
    # With the hidden state of the token before each row (a KV cache's), an image that
    # opens a row reads it; the others are unchanged.
    row_before = torch.randn(B, H, generator=torch.Generator().manual_seed(1))
    opening = [i for i, (b, col) in enumerate(starts) if col == 0]
    for i in opening:
        expected[i] = norm(row_before[starts[i][0]])
    got = prompt_vectors(routing.to_sorted(h_seq), routing, len(expected), T, norm, row_before)
    assert opening and torch.equal(got, torch.stack(expected))


@pytest.fixture(scope="module")
def base(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def fused(base, **kw):
    torch.manual_seed(0)
    cfg = FusionConfig(base="tiny", image_mode="pixel", image_size=SIZE, patch_size=PATCH, patcher="linear",
                       attention_backend="sdpa", objective="rectified_flow", image_position="sincos",
                       patcher_layers=1, **kw)
    return LMFusionModel(copy.deepcopy(base), cfg).eval()


def captured_contexts(model, batch):
    seen = []
    hook = model.image_tokenizer.predictor.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        hook.remove()
    return seen[0], out


def test_each_image_reads_the_base_models_last_hidden_state_at_its_boi(base):
    """Two rows, three documents (two generation, one understanding): each image's
    vector equals the base model's final-norm hidden state at the last token of its own
    document's prefix [BOS caption BOI], run alone; packing leaks nothing across
    documents."""
    model = fused(base, prompt_context=True)
    boi, eoi = model.boi_id, model.eoi_id
    g = torch.Generator().manual_seed(1)
    img = lambda t: ImageSegment(torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1, timestep=t)
    cap = lambda n, s: torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(s)).tolist()
    c1, c2, c3 = cap(5, 1), cap(3, 2), cap(6, 3)
    prefixes = [[1] + c1 + [boi], [1, boi], [1] + c3 + [boi]]
    rows = [[[TextSegment([1] + c1), TextSegment([boi]), img(600.0), TextSegment([eoi, 2])],
             [TextSegment([1, boi]), img(0.0), TextSegment([eoi] + c2 + [2])]],
            [[TextSegment([1] + c3), TextSegment([boi]), img(300.0), TextSegment([eoi, 2])]]]
    batch = PackedBatch.from_rows(rows, seq_len=24, tokens_per_image=model.tokens_per_image)
    got, _ = captured_contexts(model, batch)
    for i, prefix in enumerate(prefixes):
        ids = torch.tensor(prefix)
        with torch.no_grad():
            ref = base.model(inputs_embeds=model.embed(ids)[None]).last_hidden_state[0, -1]
        assert (got[i] - ref).abs().max().item() <= 1e-5, i
    assert got.abs().amax(1).min() > 0.1


def test_starts_as_the_model_without_it_then_trains_its_projection(base):
    """Zero-initialised: the loss equals that of the same model without
    prompt_context, bitwise; once the output projection has moved, the vector's
    projection gets gradients and the text tower none."""
    with_it, without = fused(base, prompt_context=True), fused(base)
    g = torch.Generator().manual_seed(2)
    doc = [TextSegment([1, 5, 6, 7]), TextSegment([with_it.boi_id]),
           ImageSegment(torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1, timestep=500.0),
           TextSegment([with_it.eoi_id, 2])]
    batch = PackedBatch.from_rows([[doc]], seq_len=12, tokens_per_image=with_it.tokens_per_image)
    noise = torch.randn(1, 3, SIZE, SIZE, generator=g)
    with_it.train(), without.train()
    loss = with_it(batch, noise=noise).loss
    assert torch.equal(loss, without(batch, noise=noise).loss)
    # The output projection is zero-initialised too, so the first step moves only it;
    # once it is nonzero the vector's projection learns through the blocks' residual.
    with torch.no_grad():
        with_it.image_tokenizer.predictor.proj.weight.normal_(std=0.02)
    with_it(batch, noise=noise).loss.backward()
    projection = with_it.image_tokenizer.predictor.blocks.context
    assert projection.weight.grad.abs().sum() > 0
    frozen = with_it.text_tower_parameter_names()
    assert frozen and all(p.grad is None for n, p in with_it.named_parameters() if n in frozen)


def test_needs_the_output_blocks():
    with pytest.raises(ValueError, match="prompt_context.*patcher_layers"):
        FusionConfig(base="tiny", patcher_layers=0, prompt_context=True).validate()
