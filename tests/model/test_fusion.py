"""The fused model against independent references: the base LlamaForCausalLM's own
forward and generate, autograd's view of which parameters received gradients, and
FlopCounterMode's count of the dense model's multiply-adds."""
import copy
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import BaseModelError, load_base_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]


def pixel_cfg(**kw) -> FusionConfig:
    args = dict(image_mode="pixel", image_size=16, patch_size=4, patcher="linear", attention_backend="sdpa")
    args.update(kw)
    return FusionConfig(**args)


def text_batch(ids_rows):
    return PackedBatch.from_rows([[[TextSegment(ids)]] for ids in ids_rows], seq_len=max(map(len, ids_rows)), tokens_per_image=1)


def fused_greedy(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        out = model(text_batch([ids]), return_logits=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
@torch.no_grad()
def test_text_only_matches_base_logits_and_greedy(which, tiny_base_dir, smollm2_base):
    if which == "tiny":
        base = load_base_model(tiny_base_dir)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (7, 12, 20)]
    else:
        from megafusion.model.loading import load_tokenizer

        base = smollm2_base
        tok = load_tokenizer("smollm2")
        prompts = [tok(p).input_ids for p in PROMPTS]
    base.eval()
    fused = LMFusionModel(copy.deepcopy(base), pixel_cfg()).eval()
    V = base.config.vocab_size
    for ids in prompts:
        ref = base(torch.tensor([ids])).logits
        got = fused(text_batch([ids]), return_logits=True).logits
        assert got.shape[-1] == V + 2
        assert (got[..., :V] - ref).abs().max().item() <= 1e-5
    # Greedy continuation, 32 tokens, with the base model's own generate().
    ids = prompts[0]
    ref = base.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                        eos_token_id=None, pad_token_id=0)[0].tolist()
    assert fused_greedy(fused, ids, 32) == ref


def test_smollm2_knows_paris(smollm2_base):
    from megafusion.model.loading import load_tokenizer

    tok = load_tokenizer("smollm2")
    fused = LMFusionModel(copy.deepcopy(smollm2_base), pixel_cfg()).eval()
    ids = tok("The capital of France is").input_ids
    with torch.no_grad():
        out = fused_greedy(fused, ids, 3)
    assert "Paris" in tok.decode(out[len(ids):])


def mixed_batch(model, seed=0, caption_after_image_only=False):
    """Two rows: generation (caption, BOI, image, EOI) and understanding (BOI, image,
    EOI, caption) documents."""
    g = torch.Generator().manual_seed(seed)
    C, h, w = model.image_tokenizer.latent_shape
    img = lambda t, cond=False: ImageSegment(torch.randn(C, h, w, generator=g), timestep=t, is_condition=cond)
    txt = lambda n, loss=True: TextSegment(torch.randint(3, 300, (n,), generator=g).tolist(), loss=loss)
    boi, eoi = TextSegment([model.boi_id]), TextSegment([model.eoi_id])
    if caption_after_image_only:
        rows = [[[boi, img(0.0, True), eoi, txt(6)]]]
    else:
        rows = [
            [[txt(5), boi, img(700.0), eoi], [txt(3)]],
            [[boi, img(200.0, True), eoi, txt(6)], [txt(4), boi, img(999.0), eoi, txt(2)]],
        ]
    T = model.tokens_per_image
    return PackedBatch.from_rows(rows, seq_len=3 * T + 20, tokens_per_image=T)


def unzero_output_layer(model):
    """The image output layer is zero-initialised (the first prediction is 0), which
    makes the image tower's last-layer queries receive exactly zero gradient at step 0;
    give it small random weights so that "every used parameter has a gradient" is
    checkable in one step."""
    with torch.no_grad():
        for p in model.image_tokenizer.predictor.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)


def test_gradients_reach_image_tower_only(tiny_base_dir):
    model = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg())
    unzero_output_layer(model)
    out = model(mixed_batch(model))
    assert out.n_text_targets > 0 and out.n_noised_images == 3
    out.loss.backward()
    text_names = model.text_tower_parameter_names()
    assert text_names, "text tower must have parameters"
    for name, p in model.named_parameters():
        if name in text_names:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_caption_loss_alone_trains_image_tower(tiny_base_dir):
    """Understanding: the LM loss of a caption after a clean image must flow back into
    the image tower through the shared attention."""
    model = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg())
    batch = mixed_batch(model, caption_after_image_only=True)
    out = model(batch)
    assert out.n_noised_images == 0 and out.diffusion_loss.item() == 0.0
    out.loss.backward()
    image_layer_grads = [p.grad for layer in model.layers for p in layer.image.parameters()]
    assert all(g is not None for g in image_layer_grads)
    assert sum(g.abs().sum() for g in image_layer_grads) > 0
    assert all(p.grad is None for layer in model.layers for p in layer.text.parameters())


def test_lm_targets_exclude_images_and_boi(tiny_base_dir):
    model = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg())
    batch = mixed_batch(model)
    tgt = model.lm_targets(batch)
    # Brute force from the definition.
    B, L = batch.labels.shape
    for b in range(B):
        for i in range(L):
            ok = (i + 1 < L and batch.document_ids[b, i] == batch.document_ids[b, i + 1]
                  and batch.modality[b, i] == 0 and batch.modality[b, i + 1] == 0
                  and batch.labels[b, i + 1] != -100 and batch.labels[b, i + 1] != model.boi_id)
            assert tgt[b, i].item() == (batch.labels[b, i + 1].item() if ok else -100)
    # BOI is never a target; EOI follows an image position, which predicts nothing.
    assert (tgt == model.boi_id).sum() == 0 and (tgt == model.eoi_id).sum() == 0
    assert (tgt != -100).sum() > 10
    model.cfg.lm_loss_on_boi = True
    assert (model.lm_targets(batch) == model.boi_id).sum() == 2  # the two generation documents


def linear_macs_in_layers(model, run) -> int:
    with FlopCounterMode(display=False) as fc:
        run()
    total = 0
    for mod, counts in fc.get_flop_counts().items():
        if not re.search(r"\.layers\.\d+$", mod):  # one entry per decoder layer
            continue
        total += sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    return total


def test_linear_flops_equal_dense_model(tiny_base_dir):
    base = load_base_model(tiny_base_dir)
    model = LMFusionModel(copy.deepcopy(base), pixel_cfg())
    batch = mixed_batch(model)
    B, L = batch.input_ids.shape
    fused = linear_macs_in_layers(model, lambda: model(batch))
    dense = linear_macs_in_layers(base, lambda: base(torch.randint(3, 300, (B, L))))
    assert fused > 0 and fused == dense


def test_new_token_rows_leave_frozen_embedding_untouched(tiny_base_dir):
    base = load_base_model(tiny_base_dir)
    ref = base.model.embed_tokens.weight.detach().clone()
    model = LMFusionModel(base, pixel_cfg())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(mixed_batch(model)).loss.backward()
        opt.step()
    assert torch.equal(model.embed_tokens.weight, ref)
    assert model.image_token_embed.grad is not None


def test_bad_base_paths_give_one_line_errors(tmp_path):
    with pytest.raises(BaseModelError, match="no such file") as e:
        load_base_model(str(tmp_path / "missing"))
    assert "\n" not in str(e.value)
    (tmp_path / "notllama").mkdir()
    (tmp_path / "notllama" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(BaseModelError, match="Llama-family"):
        load_base_model(str(tmp_path / "notllama"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(BaseModelError, match="broken.gguf") as e:
        load_base_model(str(bad))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="config.json"):
        load_base_model(str(tmp_path / "empty"))


def test_caption_loss_is_the_lm_loss_over_text_after_an_image(tiny_base_dir):
    """after_image against a per-position loop, and caption_loss against cross-entropy of
    the full logits at exactly those targets."""
    import torch.nn.functional as F

    from megafusion.model.fusion import LMFusionModel

    torch.manual_seed(0)
    cfg = pixel_cfg()
    model = LMFusionModel(load_base_model(tiny_base_dir), cfg).eval()
    tpi, shape = model.tokens_per_image, model.image_tokenizer.latent_shape
    boi, eoi = model.boi_id, model.eoi_id
    img = lambda t: ImageSegment(torch.rand(shape) * 2 - 1, timestep=t, is_condition=t == 0)  # noqa: E731
    gen = [TextSegment([5, 6, 7, 8]), TextSegment([boi], loss=False), img(300.0), TextSegment([eoi], loss=False)]
    und = [TextSegment([boi], loss=False), img(0.0), TextSegment([eoi, 9, 10, 11, 12])]
    text = [TextSegment([13, 14, 15])]
    batch = PackedBatch.from_rows([[gen, und], [text, und]], seq_len=2 * tpi + 20, tokens_per_image=tpi,
                                  image_shape=shape)
    got = LMFusionModel.after_image(batch)
    for b in range(2):
        for i in range(batch.modality.shape[1]):
            doc = batch.document_ids[b, i]
            want = any(batch.modality[b, j] != 0 and batch.document_ids[b, j] == doc for j in range(i))
            assert bool(got[b, i]) == want, (b, i)
    with torch.no_grad():
        out = model(batch, return_logits=True)
    targets = model.lm_targets(batch)
    sel = (targets != -100) & got & (batch.modality == 0)
    want = F.cross_entropy(out.logits[sel].float(), targets[sel])
    assert out.n_caption_targets == int(sel.sum()) == 2 * 4  # eoi->9..12 in both rows
    torch.testing.assert_close(out.caption_loss, want, rtol=1e-5, atol=1e-6)


def test_loss_weights_scale_each_losses_gradient(tiny_base_dir):
    """model.lm_loss_weight and model.diffusion_loss_weight (X-Fusion: 0.2 and 1): each
    loss's gradient alone, measured with the other weight 0, scales by its weight."""
    def grads(**w):
        torch.manual_seed(0)
        model = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg(**w))
        unzero_output_layer(model)
        noise = torch.randn(3, *model.image_tokenizer.latent_shape, generator=torch.Generator().manual_seed(1))
        model(mixed_batch(model), noise=noise).loss.backward()
        return model.layers[0].image.q_proj.weight.grad.clone()

    lm, diff = grads(lm_loss_weight=1.0, diffusion_loss_weight=0.0), grads(lm_loss_weight=0.0, diffusion_loss_weight=1.0)
    assert lm.abs().max() > 0 and diff.abs().max() > 0
    torch.testing.assert_close(grads(lm_loss_weight=0.2, diffusion_loss_weight=1.0), 0.2 * lm + diff, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="lm_loss_weight"):
        pixel_cfg(lm_loss_weight=-1.0).validate()


def _swap_patches(x, a=(0, 0), b=(2, 3), p=4):
    """x [N, C, H, W] with patches a and b (grid row, column) exchanged."""
    x = x.clone()
    (ra, ca), (rb, cb) = a, b
    pa = x[..., ra * p:(ra + 1) * p, ca * p:(ca + 1) * p].clone()
    x[..., ra * p:(ra + 1) * p, ca * p:(ca + 1) * p] = x[..., rb * p:(rb + 1) * p, cb * p:(cb + 1) * p]
    x[..., rb * p:(rb + 1) * p, cb * p:(cb + 1) * p] = pa
    return x


@pytest.mark.parametrize("rope", ["shared", "sequential"])
def test_shared_image_rope_leaves_an_images_tokens_no_order(tiny_base_dir, rope):
    """model.image_rope=shared with the position table at zero: an image's tokens are a
    set. Swapping two patches of the noisy image swaps the same two patches of the
    prediction, changes nothing else, and leaves the text after the image as it was.
    With sequential positions the raster order still tells the tokens apart: the same
    swap changes the prediction otherwise."""
    torch.manual_seed(0)
    model = LMFusionModel(load_base_model(tiny_base_dir),
                          pixel_cfg(objective="rectified_flow", image_position="learned", image_rope=rope)).eval()
    unzero_output_layer(model)
    with torch.no_grad():
        model.image_tokenizer.embedder.position.zero_()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1, torch.randn(1, 3, 16, 16, generator=g)

    def run(x0, noise):
        doc = [TextSegment([1, 5, 9, 12]), TextSegment([model.boi_id]), ImageSegment(x0[0], timestep=700.0),
               TextSegment([model.eoi_id, 40, 41])]
        batch = PackedBatch.from_rows([[doc]], seq_len=8 + model.tokens_per_image, tokens_per_image=model.tokens_per_image)
        with torch.no_grad():
            out = model(batch, noise=noise, return_logits=True)
        return out.image_prediction, out.logits[0, -3:]

    pred, text = run(x0, noise)
    pred_swapped, text_swapped = run(_swap_patches(x0), _swap_patches(noise))
    assert pred.abs().max() > 0.01
    moved = (pred_swapped - _swap_patches(pred)).abs().max().item()
    # Measured: 6e-8 (float rounding) shared, 1.1e-4 sequential, on predictions of ~0.5.
    if rope == "shared":
        assert moved <= 1e-6
        assert (text_swapped - text).abs().max().item() <= 1e-5
    else:
        assert moved > 1e-5
    with pytest.raises(ValueError, match="image_rope=shared"):
        pixel_cfg(image_rope="shared").validate()  # without a table the tokens would know no place
