"""The planner's activation memory (megafusion/plan/memory.py) against what autograd keeps.

A small fused model runs one forward pass of a packed micro-batch (caption + BOI + image +
EOI documents, the planner's Workload) in bf16, the planner's w = 2, and every tensor
autograd saves for the backward pass is recorded with torch.autograd.graph.
saved_tensors_hooks, each storage counted once and attributed to the decoder layer (or
the final norms) that saved it first; parameters, and the per-forward tensors every layer
shares (RoPE cos/sin, the routing and attention-layout indices), are left out, as the
planner leaves them out. This is compared with the planner's bytes per layer without
activation checkpointing, with it (a layer keeps its input), and with its "activations"
part (all layers and the final norms) either way.

Attention is the flash decomposition (megafusion/model/attention.py) over a stand-in for
flash_attn_varlen_func that saves what flash-attn saves (q, k, v, the output and an fp32
log-sum-exp per head and query) and no (query, key) matrix, as the planner assumes; CPU
SDPA alone would save each segment's output apart from the concatenated one.

The base is a random Llama shaped like Llama-3 8B in proportion (key/value width a
quarter of the hidden size, MLP 3.5x), so each term weighs in the layer about what it
weighs there.
"""
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megafusion.config import load_config
from megafusion.model.attention import AttentionLayout, sdpa_varlen_primitive
from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
from megafusion.model.fusion import LMFusionModel
from megafusion.plan.memory import activation_parts, layer_activation_bytes_per_token
from megafusion.plan.setting import Setting, workload
from megafusion.plan.shapes import model_shape

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SEQ_LEN = 1024

# The formula counts every tensor autograd saves here, so measured and planned agree to a
# few bytes (a tanh(gate) scalar). 5% leaves room for what a GPU run saves that this CPU
# stand-in does not (flash-attn's RNG state, its head-dim padding for other head sizes)
# and for an allocator's rounding, yet dropping or doubling any term worth 5% of a layer
# fails: the MLP (about half of it), the fp32 norm inputs (~16%), a trainable tower's
# bf16 norm copies (~12%), q/k/v and the attention output (~10%), the image queries'
# second attention call (~7%) (shares for lmfusion at 256-token images, below).
TOLERANCE = 0.05


class FlashLike(torch.autograd.Function):
    """flash_attn_varlen_func's saved tensors (q, k, v, out, lse [H, total_q] fp32) with
    SDPA computing the values; the backward recomputes through SDPA."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        with torch.no_grad():
            out = sdpa_varlen_primitive(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            dq, dk, dv = torch.autograd.grad(sdpa_varlen_primitive(q, k, v, *ctx.args), (q, k, v), grad)
        return dq, dk, dv, None, None, None, None, None, None


def flash_like(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=None):
    return FlashLike.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


@pytest.fixture(scope="module")
def base_8b_proportions(tmp_path_factory):
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base-8b-proportions")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def packed_batch(model, wl) -> PackedBatch:
    """Rows of wl.docs_per_row caption + BOI + noised image + EOI documents, the rest text."""
    g = torch.Generator().manual_seed(0)
    C, h, w = model.image_tokenizer.latent_shape
    text = lambda n: TextSegment(torch.randint(3, 500, (n,), generator=g).tolist())  # noqa: E731
    rows = []
    for _ in range(wl.micro_batch):
        docs = [[text(wl.caption_tokens), TextSegment([model.boi_id]),
                 ImageSegment(torch.randn(C, h, w, generator=g), timestep=500.0), TextSegment([model.eoi_id])]
                for _ in range(wl.docs_per_row)]
        left = wl.seq_len - wl.docs_per_row * wl.doc_len
        if left:
            docs.append([text(left)])
        rows.append(docs)
    return PackedBatch.from_rows(rows, seq_len=wl.seq_len, tokens_per_image=wl.tokens_per_image)


def saved_bytes(model, batch) -> dict:
    """Bytes of the distinct storages one forward pass saves for backward: per decoder
    layer ("layers", a list) and for the final norms; the rest (embedding, patcher, logits,
    losses) under "other"."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared, head_outputs, owner = set(), set(), {}
    where = ["other"]

    def ptr(t):
        return t.untyped_storage().data_ptr()

    def run_layer(layer, h, routing, cos, sin, layout):
        shared.update(ptr(t) for t in (cos, sin, routing.perm, routing.inv))
        shared.update(ptr(getattr(layout, f)) for f in AttentionLayout.__dataclass_fields__
                      if isinstance(getattr(layout, f), torch.Tensor))
        where[0] = list(model.layers).index(layer)
        out = LMFusionModel.run_layer(model, layer, h, routing, cos, sin, layout)
        where[0] = "other"
        return out

    def enter(module, args):
        where[0] = "final norms"

    def leave(module, args, out):
        head_outputs.add(ptr(out))
        where[0] = "other"

    def pack(t):
        p = ptr(t)
        if p not in params and p not in shared and p not in owner:
            owner[p] = ("final norms" if p in head_outputs else where[0], t.untyped_storage().nbytes())
        return t

    hooks = [m.register_forward_pre_hook(enter) for m in (model.text_norm, model.image_norm)]
    hooks += [m.register_forward_hook(leave) for m in (model.text_norm, model.image_norm)]
    model.run_layer = run_layer
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
    finally:
        del model.run_layer
        for hook in hooks:
            hook.remove()
    out = {"layers": [0] * len(model.layers), "final norms": 0, "other": 0}
    for region, nbytes in owner.values():
        if isinstance(region, int):
            out["layers"][region] += nbytes
        else:
            out[region] += nbytes
    return out


@pytest.mark.parametrize("tower_mode, overrides, caption_tokens, image_size", [
    ("lmfusion", [], 32, 64),      # the 8B/70B configs' design and documents: 256-token images
    ("lmfusion", [], 200, 32),     # caption-heavy: 64-token images, 3/4 of the tokens text
    ("lmfusion", ["model.train_text_tower=true", "train.text_lr=1e-4"], 32, 64),
    ("dual_tower", [], 32, 64),
    ("xfuse", [], 32, 64),
    ("gated_tower", [], 32, 64),
], ids=["lmfusion", "lmfusion-long-captions", "lmfusion-text-trains", "dual_tower", "xfuse", "gated_tower"])
def test_planned_activations_match_what_autograd_saves(base_8b_proportions, one_thread, tower_mode, overrides,
                                                       caption_tokens, image_size):
    cfg = load_config(TINY, [f"model.base={base_8b_proportions}", f"model.tower_mode={tower_mode}",
                             "model.attention_backend=flash", f"model.image_size={image_size}", "model.patch_size=4",
                             "train.dtype=bf16", *overrides])
    shape = model_shape(cfg)
    torch.manual_seed(0)
    model = LMFusionModel.from_base(cfg.model.base, cfg.model, dtype=torch.bfloat16).to(torch.bfloat16).train()
    model.attention_primitive = flash_like
    wl = workload(shape, Setting(zero_stage=3, micro_batch=1), SEQ_LEN, caption_tokens)
    assert wl.image_tokens > 0 and wl.text_tokens > 0
    batch = packed_batch(model, wl)

    for checkpointing in (False, True):
        model.cfg.activation_checkpointing = checkpointing
        measured = saved_bytes(model, batch)
        if checkpointing:  # a layer keeps its input alone
            planned_layer = wl.tokens * shape.hidden * 2
        else:
            planned_layer = wl.tokens * layer_activation_bytes_per_token(shape, 2, wl)
        for i, got in enumerate(measured["layers"]):
            assert abs(got / planned_layer - 1) <= TOLERANCE, (checkpointing, i, got, planned_layer)
        # The planner's "activations": every layer's keep and the final norms'.
        planned = activation_parts(shape, Setting(zero_stage=3, micro_batch=1, checkpointing=checkpointing), wl,
                                   shape.layers, 1, logits=True, unet_sides=2)["activations"]
        got = sum(measured["layers"]) + measured["final norms"]
        assert abs(got / planned - 1) <= TOLERANCE, (checkpointing, got, planned)
