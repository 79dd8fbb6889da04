"""The decoder-layer designs (model.tower_mode) against independent references:
transformers' own LlamaDecoderLayer run as each paper describes the design (every block
over the whole sequence, each token taking its tower's output or the mix), the base
model's logits, autograd's view of which parameters got gradients, and FlopCounterMode's
count of the linear layers against closed-form extra costs."""
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from megafusion.model.attention import AttentionLayout
from megafusion.model.config import FusionConfig
from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import load_base_model
from megafusion.model.routing import Routing

from test_fusion import mixed_batch, text_batch, unzero_output_layer

X_FUSION = ["dual_tower", "xfuse", "gated_tower"]
FROZEN_TEXT = ["lmfusion"] + X_FUSION
ALL = FROZEN_TEXT + ["single_tower"]


def cfg(mode, **kw) -> FusionConfig:
    args = dict(image_mode="pixel", image_size=16, patch_size=4, patcher="linear", attention_backend="sdpa",
                tower_mode=mode, train_text_tower=mode == "single_tower")
    args.update(kw)
    return FusionConfig(**args)


def build(base_dir, mode, seed=0, **kw):
    torch.manual_seed(seed)
    return LMFusionModel(load_base_model(base_dir), cfg(mode, **kw))


def perturb_trainable(layer, seed):
    """Make the trainable tower (and the mixing scalars) differ from the text tower, or
    the designs would coincide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("text."):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def llama_block(tower, llama_config, idx) -> LlamaDecoderLayer:
    """A transformers LlamaDecoderLayer holding a tower's weights."""
    block = LlamaDecoderLayer(llama_config, idx)
    a = block.self_attn
    for dst, src in ((a.q_proj, tower.q_proj), (a.k_proj, tower.k_proj), (a.v_proj, tower.v_proj),
                     (a.o_proj, tower.o_proj), (block.mlp, tower.mlp), (block.input_layernorm, tower.input_layernorm),
                     (block.post_attention_layernorm, tower.post_attention_layernorm)):
        dst.load_state_dict(src.state_dict())
    return block.eval()


def brute_mask(batch):
    """[B, 1, L, L] bool from the definition: same document, and causal or same image."""
    d, im = batch.document_ids, batch.image_ids
    L = d.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same_doc = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    same_img = (im[:, :, None] >= 0) & (im[:, :, None] == im[:, None, :])
    m = same_doc & (causal | same_img)
    m |= torch.eye(L, dtype=torch.bool)  # padding rows see themselves (ignored below)
    return m[:, None]


@pytest.mark.parametrize("mode", X_FUSION + ["single_tower"])
@torch.no_grad()
def test_layer_equals_the_paper_form_with_transformers_blocks(mode, tiny_base_dir):
    """Each design's layer against its definition written with whole transformers blocks:
    H_text = F_text(h), H_vision = F_vision(h) over every token, then
      dual_tower:   image tokens take H_vision, text tokens H_text;
      xfuse:        image tokens take alpha H_text + beta H_vision;
      gated_tower:  image tokens take H_text + tanh(g) (H_vision - h);
      single_tower: every token takes H_text (one tower)."""
    model = build(tiny_base_dir, mode).eval()
    batch = mixed_batch(model)
    routing = Routing.from_modality(batch.modality)
    layout = AttentionLayout.build(batch.document_ids, batch.image_ids, "sdpa")
    B, L = batch.modality.shape
    hidden = model.llama_config.hidden_size
    h = torch.randn(B * L, hidden, generator=torch.Generator().manual_seed(1))
    cos, sin = model.rotary_emb(h, batch.position_ids)
    mask = brute_mask(batch)
    real = (batch.document_ids >= 0)
    is_image = (batch.modality != 0)[..., None]
    for i, layer in enumerate(model.layers):
        perturb_trainable(layer, seed=10 + i)
        got = routing.to_sequence(layer(h, routing, cos, sin, layout))
        x = routing.to_sequence(h)
        h_text = llama_block(layer.text, model.llama_config, i)(x, attention_mask=mask, position_embeddings=(cos, sin))
        h_text = h_text[0] if isinstance(h_text, tuple) else h_text
        if mode == "single_tower":
            want = h_text
        else:
            h_vis = llama_block(layer.image, model.llama_config, i)(x, attention_mask=mask, position_embeddings=(cos, sin))
            h_vis = h_vis[0] if isinstance(h_vis, tuple) else h_vis
            image_out = {"dual_tower": lambda: h_vis,
                         "xfuse": lambda: layer.alpha * h_text + layer.beta * h_vis,
                         "gated_tower": lambda: h_text + torch.tanh(layer.gate) * (h_vis - x)}[mode]()
            want = torch.where(is_image, image_out, h_text)
            # The trainable block shapes the image tokens (the check above could not miss it).
            assert (image_out - h_text)[(is_image & real[..., None]).expand_as(x)].abs().max() > 1e-2
        assert (got - want)[real].abs().max().item() <= 1e-5, f"layer {i}"
        assert (want - x)[real].abs().max() > 1e-2


@pytest.mark.parametrize("mode", ALL)
@torch.no_grad()
def test_text_only_input_gives_the_base_logits(mode, tiny_base_dir):
    """Designs that freeze the text path give the base model's logits whatever their
    trainable weights hold; single_tower gives them before training."""
    base = load_base_model(tiny_base_dir).eval()
    model = build(tiny_base_dir, mode).eval()
    if mode != "single_tower":
        for i, layer in enumerate(model.layers):
            perturb_trainable(layer, seed=i)
    V = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    for n in (5, 17):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        want = base(torch.tensor([ids])).logits
        got = model(text_batch([ids]), return_logits=True).logits[..., :V]
        assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", ALL)
def test_gradients_only_where_they_should_be(mode, tiny_base_dir):
    model = build(tiny_base_dir, mode)
    unzero_output_layer(model)
    if mode == "gated_tower":
        # At g = 0 the gated block's weights get exactly zero gradient (tanh(0) x ...);
        # open the gate to check that they are in the graph.
        for layer in model.layers:
            layer.gate.data.fill_(0.3)
    out = model(mixed_batch(model))
    out.loss.backward()
    text = model.text_tower_parameter_names()
    assert text
    for name, p in model.named_parameters():
        if mode != "single_tower" and name in text:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad, name
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    if mode == "single_tower":
        assert all(not n.startswith("layers.") or ".text." in n for n, _ in model.named_parameters())


def test_gated_tower_starts_as_the_frozen_llm_and_its_gate_learns(tiny_base_dir):
    """At g = 0 image tokens go through the text weights alone (the trainable block's
    weights change nothing), and the gate itself gets a gradient."""
    model = build(tiny_base_dir, "gated_tower")
    batch = mixed_batch(model)
    noise = torch.randn(3, *model.image_tokenizer.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch, noise=noise).image_prediction
        for i, layer in enumerate(model.layers):
            perturb_trainable(layer, seed=i)
            layer.gate.zero_()
        after = model(batch, noise=noise).image_prediction
    assert torch.equal(before, after)
    unzero_output_layer(model)
    model(batch, noise=noise).loss.backward()
    assert all(layer.gate.grad.abs().item() > 0 for layer in model.layers)


def test_xfuse_at_its_initial_mix_equals_dual_tower(tiny_base_dir):
    dual = build(tiny_base_dir, "dual_tower", seed=3)
    xfuse = build(tiny_base_dir, "xfuse", seed=3)
    for a, b in zip(dual.layers, xfuse.layers):
        assert a.image.q_proj.weight.data_ptr() != b.image.q_proj.weight.data_ptr()
    with torch.no_grad():  # the same trainable weights, away from the copy of the text tower
        for i, (a, b) in enumerate(zip(dual.layers, xfuse.layers)):
            perturb_trainable(a, seed=i)
            b.image.load_state_dict(a.image.state_dict())
    assert [(float(x.alpha.detach()), float(x.beta.detach())) for x in xfuse.layers] == [(0.0, 1.0)] * len(xfuse.layers)
    batch = mixed_batch(dual)
    noise = torch.randn(3, *dual.image_tokenizer.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dual(batch, noise=noise, return_logits=True), xfuse(batch, noise=noise, return_logits=True)
    assert torch.equal(a.image_prediction, b.image_prediction)
    assert torch.equal(a.logits, b.logits)


def single_tower_is_refused_without_a_trainable_text_tower():
    with pytest.raises(ValueError, match="train_text_tower") as e:
        FusionConfig(tower_mode="single_tower").validate()
    assert "\n" not in str(e.value)


def test_config_names_the_designs():
    single_tower_is_refused_without_a_trainable_text_tower()
    with pytest.raises(ValueError, match="tower_mode='two_towers'"):
        FusionConfig(tower_mode="two_towers").validate()
    for mode in ALL:
        FusionConfig(tower_mode=mode, train_text_tower=mode == "single_tower").validate()


def linear_flops(model, batch) -> int:
    """Forward FLOPs of the matmuls inside the decoder layers."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(batch)
    return sum(v for mod, counts in fc.get_flop_counts().items() if re.search(r"\.layers\.\d+$", mod)
               for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))


def test_linear_flops_of_each_design_against_closed_form(tiny_base_dir):
    """Forward FLOPs are 2 x weights per token through each linear layer. Against
    lmfusion (every token through one tower's layers): dual_tower adds one q/k/v
    projection of every token; xfuse and gated_tower add, on top, the o_proj and MLP of
    the second block at every image token; single_tower adds nothing."""
    flops = {m: linear_flops(build(tiny_base_dir, m), mixed_batch(build(tiny_base_dir, m))) for m in ALL}
    lc = load_base_model(tiny_base_dir).config
    h, kv = lc.hidden_size, lc.num_key_value_heads * (lc.hidden_size // lc.num_attention_heads)
    qkv = h * h + 2 * h * kv
    rest = h * h + 3 * h * lc.intermediate_size
    batch = mixed_batch(build(tiny_base_dir, "lmfusion"))
    n, n_img = batch.modality.numel(), int((batch.modality != 0).sum())
    layers = lc.num_hidden_layers
    assert flops["single_tower"] == flops["lmfusion"] == 2 * layers * n * (qkv + rest)
    assert flops["dual_tower"] - flops["lmfusion"] == 2 * layers * n * qkv
    assert flops["xfuse"] - flops["dual_tower"] == 2 * layers * n_img * rest
    assert flops["gated_tower"] == flops["xfuse"]
