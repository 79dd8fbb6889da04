"""Pipeline stages (megafusion/parallel/pipeline.py) against independent references: the
device their parameters are on (a stand-in accelerator, tests/parallel/fake_accelerator.py),
the same stages without activation checkpointing, the base checkpoint on disk, and two
real pipeline ranks reporting what they hold."""
import contextlib
import json
from pathlib import Path

import pytest
import torch

from megafusion.config import load_config
from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
from megafusion.model.loading import load_base_model
from megafusion.parallel.pipeline import DecoderStage, EmbedStage, HeadStage, StageSource, batch_to_inputs

from fake_accelerator import FAKE, fake_accelerator, move_to_fake, tensors_in

REPO = Path(__file__).resolve().parents[2]


# Overrides for each decoder-layer design (model.tower_mode).
DESIGNS = {"lmfusion": (), "xfuse": ("model.tower_mode=xfuse",), "gated_tower": ("model.tower_mode=gated_tower",),
           "single_tower": ("model.tower_mode=single_tower", "model.train_text_tower=true", "train.text_lr=1e-4")}


def tiny_cfg(base, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [f"model.base={base}", *overrides])


def all_stages(cfg):
    """Every stage of the model built in one process, as a one-stage pipeline would."""
    source = StageSource(cfg)
    n = source.weights.config.num_hidden_layers
    return source, [EmbedStage(source)] + [DecoderStage(source, i) for i in range(n)] + [HeadStage(source)]


def mixed_batch(fused, seed=0):
    """Generation (caption, image) and understanding (clean image, caption) documents."""
    g = torch.Generator().manual_seed(seed)
    C, h, w = fused.image_tokenizer.latent_shape
    img = lambda t, cond=False: ImageSegment(torch.randn(C, h, w, generator=g), timestep=t, is_condition=cond)
    txt = lambda n: TextSegment(torch.randint(3, 300, (n,), generator=g).tolist())
    boi, eoi = TextSegment([fused.boi_id]), TextSegment([fused.eoi_id])
    rows = [[[txt(5), boi, img(700.0), eoi], [txt(3)]],
            [[boi, img(0.0, True), eoi, txt(6)], [txt(4), boi, img(999.0), eoi, txt(2)]]]
    T = fused.tokens_per_image
    return PackedBatch.from_rows(rows, seq_len=3 * T + 20, tokens_per_image=T)


def text_batch(fused):
    T = fused.tokens_per_image
    return PackedBatch.from_rows([[[TextSegment(list(range(3, 40)))]]], seq_len=40, tokens_per_image=T,
                                 image_shape=fused.image_tokenizer.latent_shape)


@pytest.mark.parametrize("kind", ["mixed", "text_only"])
def test_every_tensor_a_stage_emits_is_on_the_stage_device(tiny_llama, kind):
    """DeepSpeed sends a stage's outputs as they are (NCCL: CUDA tensors only). On the
    stand-in accelerator, every emitted tensor must be where the stage's parameters are;
    the inputs are moved there first, as the engine's micro-batch loader does."""
    source, stages = all_stages(tiny_cfg(tiny_llama))
    batch = mixed_batch(source.fused) if kind == "mixed" else text_batch(source.fused)
    with fake_accelerator():
        for stage in stages:
            move_to_fake(stage)
        x = tuple(t.to(FAKE) for t in batch_to_inputs(batch))
        for stage in stages:
            device = next(stage.parameters()).device
            assert device == FAKE
            x = stage(x)
            off = [(i, str(t.device)) for i, t in enumerate(tensors_in(x)) if t.device != device]
            assert not off, f"{type(stage).__name__} emits tensors off its device: {off}"
            # and only dtypes NCCL carries (torch's NCCL type map has no int16 or complex)
            odd = [(i, t.dtype) for i, t in enumerate(tensors_in(x)) if t.dtype in (torch.int16, torch.complex64)]
            assert not odd, f"{type(stage).__name__} emits tensors NCCL cannot send: {odd}"
    assert torch.isfinite(x.elem).all()


def run_stages(stages, batch, seed):
    """Forward + backward through the stages; returns (losses, grads, what the decoder
    stages saved for backward: [bytes of each tensor])."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)  # the diffusion noise
    x = batch_to_inputs(batch)
    for stage in stages:
        stage.train()
        hooks = (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if isinstance(stage, DecoderStage)
                 else contextlib.nullcontext())
        with hooks:
            x = stage(x)
    x[0].backward()
    grads = {f"{i}.{n}": p.grad for i, s in enumerate(stages) for n, p in s.named_parameters() if p.grad is not None}
    return x.detach(), grads, saved


@pytest.mark.parametrize("prediction,design", [("epsilon", "lmfusion"), ("sample", "lmfusion"), ("edm", "lmfusion"),
                                               ("epsilon", "xfuse"), ("epsilon", "gated_tower")])
def test_stage_losses_equal_the_whole_models(tiny_llama, prediction, design):
    """Rectified flow, velocity, x-prediction or EDM's preconditioning: the head stage's
    (total, lm, diffusion) equal the single-process model's on the same batch and noise
    draw. x-prediction and edm need x_t at the head (the velocity of an x0 is (x_t - x0)
    / sigma; edm's mixes x_t in by c_skip)."""
    check_stage_losses(tiny_llama, f"model.prediction_type={prediction}", *DESIGNS[design])


def test_stage_losses_with_one_rope_position_per_image(tiny_llama):
    """model.image_rope=shared: the losses as the whole model's, and the positions the
    embedding stage hands the decoder stages put every token of an image at that image's
    first position (a loop over the tokens); text positions stay."""
    stages, batch = check_stage_losses(tiny_llama, "model.image_position=learned", "model.image_rope=shared")
    emitted = stages[0](batch_to_inputs(batch))[2]
    for b in range(batch.position_ids.shape[0]):
        for i in range(batch.position_ids.shape[1]):
            k = int(batch.image_ids[b, i])
            same = [int(batch.position_ids[b, j]) for j in range(batch.position_ids.shape[1])
                    if k >= 0 and int(batch.image_ids[b, j]) == k]
            assert int(emitted[b, i]) == (min(same) if same else int(batch.position_ids[b, i])), (b, i)
    assert bool((batch.image_ids >= 0).any())


def test_stage_losses_with_rows_and_columns_as_rope_offsets(tiny_llama):
    """model.image_rope=2d: the decoder stages read the embedding stage's three position
    streams; the losses equal the whole model's, whose positions they are."""
    stages, batch = check_stage_losses(tiny_llama, "model.image_rope=2d")
    emitted = stages[0](batch_to_inputs(batch))[2]
    assert emitted.shape == (3, *batch.position_ids.shape)
    w = stages[0].fused.image_tokenizer.grid[1]
    for b in range(batch.position_ids.shape[0]):
        for i in range(batch.position_ids.shape[1]):
            pos, k = int(batch.position_ids[b, i]), int(batch.image_ids[b, i])
            start = min((int(batch.position_ids[b, j]) for j in range(batch.position_ids.shape[1])
                         if k >= 0 and int(batch.image_ids[b, j]) == k), default=pos)
            r, c = divmod(pos - start, w)
            assert emitted[:, b, i].tolist() == [start, start + r, start + c], (b, i)


def check_stage_losses(tiny_llama, *overrides, open_predictor=False):
    """open_predictor: every zero-initialised weight of the output side (the blocks'
    residual ends, the prompt vector's projection) set to the same nonzero values in the
    whole model and the head stage, so that what they read shows in the loss."""
    from megafusion.model.fusion import LMFusionModel

    cfg = tiny_cfg(tiny_llama, "model.objective=rectified_flow", *overrides)
    torch.manual_seed(cfg.run.seed)
    _, stages = all_stages(cfg)
    torch.manual_seed(cfg.run.seed)
    whole = LMFusionModel(load_base_model(tiny_llama), cfg.model)
    with torch.no_grad():  # a predictor that is not zero, so the x0 -> velocity step shows
        for module in (whole, stages[-1]):
            module.get_submodule("image_tokenizer.predictor.proj" if module is whole else "predictor.proj") \
                .weight.copy_(torch.linspace(-0.05, 0.05, whole.image_tokenizer.predictor.proj.weight.numel())
                              .view_as(whole.image_tokenizer.predictor.proj.weight))
        for name, param in whole.image_tokenizer.predictor.named_parameters() if open_predictor else ():
            if not bool(param.any()):
                g = torch.Generator().manual_seed(len(name))
                param.normal_(std=0.05, generator=g)
                stages[-1].predictor.get_parameter(name).copy_(param)
    batch = mixed_batch(whole)
    losses, _, _ = run_stages(stages, batch, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        ref = whole(batch)
    torch.testing.assert_close(losses[2], ref.diffusion_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], ref.lm_loss.float(), rtol=1e-5, atol=1e-6)
    return stages, batch


def test_stage_losses_with_the_prompt_vector(tiny_llama):
    """model.prompt_context: the head stage finds each image's BOI among the hidden states
    it receives, as the whole model does; the diffusion losses agree, and differ from the
    same stages with the vector's projection zeroed (it is read)."""
    overrides = ("model.patcher_layers=1", "model.image_position=sincos", "model.prompt_context=true")
    stages, batch = check_stage_losses(tiny_llama, *overrides, open_predictor=True)
    with_vector = run_stages(stages, batch, seed=3)[0][2]
    with torch.no_grad():
        stages[-1].predictor.blocks.context.weight.zero_()
    assert (run_stages(stages, batch, seed=3)[0][2] - with_vector).abs() > 1e-6


def test_activation_checkpointing_recomputes_decoder_stages(tiny_llama):
    """With model.activation_checkpointing the decoder stages keep (almost) nothing for
    backward and recompute; gradients equal those of the same stages without it."""
    _, plain = all_stages(tiny_cfg(tiny_llama, "model.activation_checkpointing=false"))
    _, ckpt = all_stages(tiny_cfg(tiny_llama, "model.activation_checkpointing=true"))
    batch = mixed_batch(plain[0].fused)
    loss_p, grads_p, saved_p = run_stages(plain, batch, seed=3)
    loss_c, grads_c, saved_c = run_stages(ckpt, batch, seed=3)
    assert torch.equal(loss_p, loss_c)
    assert grads_p.keys() == grads_c.keys() and any(".layer.image." in k for k in grads_p)
    for k in grads_p:
        assert torch.equal(grads_p[k], grads_c[k]), k
    print(f"decoder stages saved {len(saved_p)} tensors / {sum(saved_p)} bytes without checkpointing, "
          f"{len(saved_c)} / {sum(saved_c)} with")
    assert sum(saved_c) * 10 < sum(saved_p) and len(saved_c) * 10 < len(saved_p)


@pytest.mark.parametrize("design", DESIGNS)
def test_stages_start_as_the_whole_model_and_leave_the_noise_stream_alone(tiny_llama, tiny_llama_untied, design):
    """Stages built one by one (each image-tokenizer side from its own seed) equal the
    whole model a single-process run builds after torch.manual_seed(run.seed), and the
    global RNG (the diffusion noise drawn next) is where that build leaves it. Each
    design: X-Fusion's mix scalars and gate start where the whole model's do, and what
    trains there trains in the stages."""
    if design == "single_tower":  # a trained text tower needs untied embeddings in a pipeline (see below)
        tiny_llama = tiny_llama_untied
    cfg = tiny_cfg(tiny_llama, *DESIGNS[design])
    torch.manual_seed(cfg.run.seed)
    source, stages = all_stages(cfg)
    after_stages = torch.rand(4)
    from megafusion.model.fusion import LMFusionModel

    torch.manual_seed(cfg.run.seed)
    whole = LMFusionModel(load_base_model(tiny_llama), cfg.model)
    after_whole = torch.rand(4)
    assert torch.equal(after_stages, after_whole)
    mine, ref = source.fused.state_dict(), whole.state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.equal(mine[k], ref[k]), k
    trains = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trains(source.fused) == trains(whole)


def test_a_trained_text_tower_with_tied_embeddings_is_refused(tiny_llama):
    """The embedding (first stage) and the LM head (last stage) of a tied base would train
    as two matrices."""
    with pytest.raises(ValueError, match="untied embeddings") as e:
        StageSource(tiny_cfg(tiny_llama, *DESIGNS["single_tower"]))
    assert "\n" not in str(e.value)


def test_stages_hold_the_base_weights_in_the_training_dtype(tiny_llama):
    """Each stage's text tower equals the base checkpoint (cast to bf16), its image tower
    starts equal to it, and nothing a stage holds is fp32."""
    source, stages = all_stages(tiny_cfg(tiny_llama, "train.dtype=bf16"))
    base = load_base_model(tiny_llama).state_dict()
    dec = [s for s in stages if isinstance(s, DecoderStage)]
    for i, stage in enumerate(dec):
        for name, p in source.base.model.layers[i].named_parameters():
            assert torch.equal(p.detach(), base[f"model.layers.{i}.{name}"].to(torch.bfloat16)), (i, name)
        for (n, t), (_, im) in zip(stage.layer.text.named_parameters(), stage.layer.image.named_parameters()):
            assert torch.equal(t, im) and im.requires_grad and not t.requires_grad, (i, n)
    assert torch.equal(stages[0].embed_tokens.weight, base["model.embed_tokens.weight"].to(torch.bfloat16))
    assert {p.dtype for s in stages for p in s.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in dec[0].rotary_emb.buffers())  # RoPE stays fp32


@pytest.mark.slow
def test_two_stages_build_only_their_own_layers(run_two_ranks, synthetic_shards, tmp_path):
    """Two pipeline stages on two gloo ranks in the large configs' settings (bf16,
    activation checkpointing, ZeRO-1 with the BF16 optimizer): each rank holds and reads
    only its stage's layers, never loads the whole base, and trains."""
    out, run_dir = tmp_path / "out", tmp_path / "run"
    run_two_ranks("pipeline_worker.py", str(out), f"run.dir={run_dir}", f"data.train={synthetic_shards}",
                  f"data.run_id=pipe-{tmp_path.name}", "train.steps=6", "checkpoint.every=0",
                  "log.every=3", "log.peak_flops_per_device=1.0e12", "parallel.pipeline_stages=2", "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json",
                  "train.dtype=bf16", "model.activation_checkpointing=true")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    layer_keys = lambda r, i: {k for k in r["base_tensors_read"] if k.startswith(f"model.layers.{i}.")}
    for r, mine, other in ((ranks[0], 0, 1), (ranks[1], 1, 0)):
        assert r["stage"] == mine and r["decoder_layers"] == [mine], r
        assert r["skeleton_layers_with_storage"] == [mine], r
        names = r["parameter_names"]
        assert all(".layer.text." in n or ".layer.image." in n for n in names if ".layer." in n)
        assert len({n.split(".")[0] for n in names if ".layer." in n}) == 1, names
        assert len(layer_keys(r, mine)) == 9 and not layer_keys(r, other), r["base_tensors_read"]
        assert r["whole_base_loads"] == [], r["whole_base_loads"]
        assert r["parameter_dtypes"] == ["torch.bfloat16"], r["parameter_dtypes"]
        # DeepSpeed's BF16_Optimizer (one replica per stage here, so nothing to partition):
        # bf16 weights, fp32 master 4 B, Adam 8 B and fp32 gradient accumulation 4 B per
        # trainable parameter (megafusion/plan/memory.py's pipeline layout).
        held, (frozen, trainable) = r["held_bytes"], r["frozen_trainable"]
        assert r["optimizer"] == "BF16_Optimizer" and held["params"] == 2 * (frozen + trainable), r
        assert 0 <= held["master"] - 4 * trainable <= 64 and 0 <= held["optimizer_state"] - 8 * trainable <= 128, r
        assert held["grads"] >= 4 * trainable, r
        print(f"rank {r['rank']}: {r['parameter_bytes']} parameter bytes, children {r['module_children']}")
    assert "EmbedStage" in ranks[0]["module_children"] and "HeadStage" not in ranks[0]["module_children"]
    assert "HeadStage" in ranks[1]["module_children"] and "EmbedStage" not in ranks[1]["module_children"]
    assert "model.norm.weight" not in ranks[0]["base_tensors_read"]
    rows = {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, 7))
    for m in rows.values():
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss", "lm_loss", "diffusion_loss")), m
    assert rows[6]["loss"] < rows[1]["loss"] and rows[6]["diffusion_loss"] < rows[1]["diffusion_loss"]
    # Throughput counts each batch once: both stages draw the same batches, so the tokens
    # and FLOPs of steps 1-3 and 4-6 are what one rank drew (x its data-parallel size,
    # 1 here), not x the number of stages. The worker's clock advances 1 s per step.
    assert ranks[0]["batches_drawn"] == ranks[1]["batches_drawn"]
    assert ranks[0]["data_parallel"] == 1
    logged = ranks[0]["scalars_logged"]
    assert [x["step"] for x in logged] == [3, 6], logged
    for x in logged:
        window = [b for b in ranks[0]["batches_drawn"] if x["step"] - 3 < b["step"] <= x["step"]]
        assert window and x["tokens_per_s"] * 3 == pytest.approx(sum(b["tokens"] for b in window), rel=1e-9)
        assert x["flops_per_s"] * 3 == pytest.approx(sum(b["flops"] for b in window), rel=1e-9)


def test_stages_choose_the_attention_backend_with_their_activations_dtype(tiny_llama, monkeypatch):
    """attention_backend auto picks flash-attn only for fp16/bf16 activations: a stage must
    pass its hidden states' dtype, as the single-process forward does (without it, a bf16
    pipeline on CUDA fell back from flash to flex)."""
    import megafusion.parallel.pipeline as pipeline

    seen = []
    real = pipeline.select_backend

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "select_backend", spy)
    source, stages = all_stages(tiny_cfg(tiny_llama, "train.dtype=bf16"))
    x = batch_to_inputs(mixed_batch(source.fused))
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
    assert seen and all(d == torch.bfloat16 for d in seen), seen


def test_decoder_stages_keep_the_fused_image_norms(tiny_llama, apex_stand_in):
    """model.fused_rmsnorm=apex under pipeline stages: each decoder stage rebuilds its
    layer's image tower from the text tower, and took plain Llama norms there (only the
    head's final norm was apex's). Now every image-tower norm is the fused module, as in
    the whole model, and the text tower's stay the base's."""
    class FusedRMSNorm(torch.nn.Module):  # apex's constructor signature; RMSNorm by its definition
        def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
            super().__init__()
            self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(normalized_shape))

        def forward(self, x):
            xf = x.float()
            return (self.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    apex_stand_in(normalization={"FusedRMSNorm": FusedRMSNorm})
    source, stages = all_stages(tiny_cfg(tiny_llama, "model.fused_rmsnorm=apex"))
    decoders = [s for s in stages if isinstance(s, DecoderStage)]
    assert decoders
    for stage in decoders:
        image, text = stage.layer.image, stage.layer.text
        assert isinstance(image.input_layernorm, FusedRMSNorm) and isinstance(image.post_attention_layernorm, FusedRMSNorm)
        assert not isinstance(text.input_layernorm, FusedRMSNorm)
        assert image.input_layernorm.weight.requires_grad and not text.input_layernorm.weight.requires_grad
        torch.testing.assert_close(image.input_layernorm.weight, text.input_layernorm.weight)
    x = batch_to_inputs(mixed_batch(source.fused))
    for stage in stages:
        x = stage(x)
    assert torch.isfinite(x).all()
