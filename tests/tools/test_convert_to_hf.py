"""tools/convert_to_hf.py end to end: a tiny model trained by the real trainer (ZeRO-3 on
two ranks; pipeline stages + ZeRO-1), exported, and loaded with plain transformers in a
fresh process without megafusion (cwd elsewhere, PYTHONPATH cleared). References are
independent of the exporter: the base model on disk, and the trainer's model rebuilt
from the base plus DeepSpeed's own consolidation (zero_to_fp32) or the pipeline's own
stage modules loading their layer files, as DeepSpeed's PipelineModule does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launchers import launcher_cmd, launcher_env

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CONVERT = str(REPO / "tools" / "convert_to_hf.py")
WORKER = str(Path(__file__).resolve().parent / "hf_load_worker.py")
TOL = 1e-5


def train(run_dir, shards, *extra, ranks=2, config="configs/tiny.yaml", steps=2, timeout=600):
    cmd = launcher_cmd(ranks) if ranks > 1 else [PY]
    cmd += [str(REPO / "megafusion" / "train.py"), "--config", str(REPO / config), f"run.dir={run_dir}",
            f"data.train={shards}", f"data.run_id={Path(run_dir).parent.name}-{Path(run_dir).name}-{os.getpid()}", f"train.steps={steps}",
            "log.tensorboard=false", *extra]
    p = subprocess.run(cmd, cwd=REPO, env=launcher_env(ranks), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return Path(run_dir)


def convert(*args, timeout=300):
    # As a user runs it: DS_ACCELERATOR unset (an earlier test's process may have set it).
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    return subprocess.run([PY, CONVERT, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def fresh_load(export_dir, inputs, tmp, base_dir=None):
    """The worker in a process that cannot import megafusion."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, tmp / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [PY, WORKER, str(export_dir), str(tmp / "inputs.pt"), str(tmp / "outputs.pt")] + ([str(base_dir)] if base_dir else [])
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return torch.load(tmp / "outputs.pt", weights_only=False)


# ------------------------------------------------------------------------- inputs

def fixed_inputs(cfg, vocab_size, seed=0):
    """A packed batch with a generation document (caption, BOI, noisy image, EOI), an
    understanding one (BOI, clean image, EOI, caption) and a text document; fixed noise."""
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
    from megafusion.model.image_io import image_latent_shape, tokens_per_image

    g = torch.Generator().manual_seed(seed)
    shape = image_latent_shape(cfg)
    T = tokens_per_image(cfg)
    boi, eoi = vocab_size, vocab_size + 1
    ids = lambda n: torch.randint(3, vocab_size, (n,), generator=g).tolist()  # noqa: E731
    img = lambda: torch.rand(shape, generator=g) * 2 - 1  # noqa: E731
    gen_doc = [TextSegment([1] + ids(6)), TextSegment([boi]), ImageSegment(img(), timestep=700.0), TextSegment([eoi, 2])]
    und_doc = [TextSegment([1, boi]), ImageSegment(img(), timestep=0.0, is_condition=True), TextSegment([eoi] + ids(5) + [2])]
    text_doc = [TextSegment([1] + ids(9))]
    L = 2 * T + 30
    batch = PackedBatch.from_rows([[gen_doc, text_doc], [und_doc]], seq_len=L, tokens_per_image=T)
    noise = torch.randn(batch.images.shape, generator=g)
    return {"batch": batch.as_dict(), "noise": noise, "text_ids": torch.tensor([[1] + ids(11), [1] + ids(11)]),
            "prompt_ids": torch.tensor([[1] + ids(7)]), "max_new_tokens": 16}


def reference_forward(fused, inputs):
    from megafusion.model.batch import PackedBatch

    with torch.no_grad():
        out = fused.eval()(PackedBatch(**inputs["batch"]), noise=inputs["noise"], return_logits=True)
    return out.logits, out.image_prediction


def zero_reference(run_dir):
    """The trainer's model: base + DeepSpeed's zero_to_fp32 state dict, strictly."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megafusion.config import load_config
    from megafusion.model.fusion import LMFusionModel

    cfg = load_config(Path(run_dir) / "config.yaml")
    fused = LMFusionModel.from_base(cfg.model.base, cfg.model)
    state = get_fp32_state_dict_from_zero_checkpoint(str(Path(run_dir) / "checkpoints"))
    missing, unexpected = fused.load_state_dict(state, strict=False)
    assert not unexpected
    everything = fused.state_dict(keep_vars=True)
    assert all(not everything[k].requires_grad for k in missing), missing  # only the frozen tower
    trainable = {n for n, p in fused.named_parameters() if p.requires_grad}
    assert trainable <= set(state)
    return fused, cfg


def pipeline_reference(run_dir):
    """The trainer's model: base + the pipeline's own stage modules, each loading its
    layer file as DeepSpeed's PipelineModule.load_state_dir does."""
    from megafusion.config import load_config
    from megafusion.parallel.pipeline import DecoderStage, EmbedStage, HeadStage, StageSource

    cfg = load_config(Path(run_dir) / "config.yaml")
    source = StageSource(cfg)  # every stage built in this process: the skeleton becomes the whole model
    fused = source.fused
    stages = [EmbedStage(source)] + [DecoderStage(source, i) for i in range(len(fused.layers))] + [HeadStage(source)]
    tag_dir = Path(run_dir) / "checkpoints" / (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    frozen = {id(p) for p in fused.parameters() if not p.requires_grad}
    for i, stage in enumerate(stages):
        state = torch.load(tag_dir / f"layer_{i:02d}-model_states.pt", weights_only=False)
        missing, unexpected = stage.load_state_dict(state, strict=False)
        assert not unexpected, (i, unexpected)
        params = dict(stage.named_parameters())
        assert all(id(params[k]) in frozen for k in missing if k in params), (i, missing)
    # The head stage's own BOI/EOI logit rows (see megafusion/parallel/pipeline.py).
    fused.untie_image_token_head()
    with torch.no_grad():
        fused.image_token_head.copy_(stages[-1].image_token_head)
    return fused, cfg


def check_round_trip(export_dir, fused, cfg, tmp, base_dir, inputs=None, text_frozen=True):
    """Loaded in a fresh process: the trainer's logits and diffusion predictions (when
    `fused`, the reference, is given), the base model's text logits and greedy output
    (where the run kept the text path frozen)."""
    from megafusion.model.loading import resolve_base

    inputs = inputs or fixed_inputs(cfg.model, fused.vocab_size)
    got = fresh_load(export_dir, inputs, tmp, base_dir=resolve_base(base_dir))
    assert not got["megafusion_modules"]
    assert str(REPO) not in [p.rstrip("/") for p in got["sys_path"]]
    # transformers copied every module of the exported code, not only the entry file.
    exported = sorted(p.name for p in Path(export_dir).glob("*.py"))
    assert set(exported) <= set(got["copied_files"]), (exported, got["copied_files"])
    ref_logits = ref_pred = None
    if fused is not None:
        ref_logits, ref_pred = reference_forward(fused, inputs)
        assert ref_pred.abs().max() > 0  # trained: the zero-initialised predictor moved
        assert (got["logits"] - ref_logits).abs().max().item() <= TOL
        assert (got["image_prediction"] - ref_pred).abs().max().item() <= TOL
    V = got["base_text_logits"].shape[-1]
    assert got["text_logits"].shape[-1] == V + 2
    if not text_frozen:
        assert (got["text_logits"][..., :V] - got["base_text_logits"]).abs().max().item() > 1e-4  # it trained
        return got, inputs, ref_logits, ref_pred
    # Text only: the base model's logits and greedy continuation.
    assert (got["text_logits"][..., :V] - got["base_text_logits"]).abs().max().item() <= TOL
    assert got["greedy"] == got["base_greedy"]
    return got, inputs, ref_logits, ref_pred


def check_layout(export_dir, run_dir, sharded=True):
    d = Path(export_dir)
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "megafusion"
    assert config["auto_map"]["AutoModelForCausalLM"] == "hf.LMFusionForCausalLM"
    assert (d / "generation_config.json").is_file()
    if sharded:
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    for f in (REPO / "megafusion" / "model").glob("*.py"):
        if f.name != "__init__.py":
            assert (d / f.name).read_bytes() == f.read_bytes(), f.name  # the trainer's code, verbatim
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    V = config["base_config"]["vocab_size"]
    assert tok.convert_tokens_to_ids(["<|begin_of_image|>", "<|end_of_image|>"]) == [V, V + 1]
    card = (d / "README.md").read_text()
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "step 2" in card and f"{rows[-1]['diffusion_loss']:.4f}" in card
    assert (d / "run_config.yaml").read_text() == (Path(run_dir) / "config.yaml").read_text()


# -------------------------------------------------------------------------- tests

@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_base(request):
    """Both kinds of base: tied embeddings (SmolLM2-like) and a Llama-3-style untied
    output head (rope scaling and GQA in both)."""
    return request.getfixturevalue("tiny_llama" if request.param == "tied" else "tiny_llama_untied")


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_base, synthetic_shards):
    return train(tmp_path_factory.mktemp("z3") / "run", synthetic_shards, f"model.base={tiny_base}")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_base, synthetic_shards):
    return train(tmp_path_factory.mktemp("pp") / "run", synthetic_shards, "parallel.pipeline_stages=2",
                 "parallel.zero_stage=1", "parallel.ds_config=ds_configs/pipeline_zero1.json",
                 f"model.base={tiny_base}")


@pytest.mark.slow
def test_zero3_round_trip(zero3_run, tmp_path, tiny_base):
    # The run directory as CHECKPOINT_DIR (newest complete checkpoint); an existing,
    # non-empty OUT_DIR is refused, then replaced with --overwrite.
    out = tmp_path / "zero3_export"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    refused(convert(zero3_run, out), "not empty", "--overwrite")
    assert (out / "keep.txt").exists()
    p = convert(zero3_run, out, "--max-shard-size", "2MB", "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    # Quiet: the output directory on stdout and no library warning anywhere.
    assert p.stdout.splitlines() == [str(out)] and "WARNING" not in p.stderr, (p.stdout + p.stderr)[-3000:]
    assert not (out / "keep.txt").exists()
    check_layout(out, zero3_run)
    fused, cfg = zero_reference(zero3_run)
    _, inputs, ref_logits, ref_pred = check_round_trip(out, fused, cfg, tmp_path / "load", tiny_base)
    # megafusion.generate reads the run directory directly too.
    from megafusion import generate as G

    gen = G.load(zero3_run)
    logits, pred = reference_forward(gen.model, inputs)
    assert (logits - ref_logits).abs().max().item() <= TOL and (pred - ref_pred).abs().max().item() <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dual_tower", "xfuse", "gated_tower", "single_tower", "xfuse+align"])
def test_zero3_round_trip_of_each_x_fusion_design(mode, tmp_path, tiny_llama, synthetic_shards):
    """Each model.tower_mode trained under ZeRO-3 on two ranks, exported and loaded with
    plain transformers: the trainer's model (base + DeepSpeed's consolidation) within
    1e-5, and the base's text where the design keeps the text path frozen. With feature
    alignment (a training loss) the export leaves the aligner behind."""
    extra = ["model.train_text_tower=true", "train.text_lr=1e-3"] if mode == "single_tower" else []
    if mode.endswith("+align"):
        import transformers

        mode = mode.split("+")[0]
        torch.manual_seed(0)
        transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           mlp_ratio=2, image_size=16, patch_size=4)
                                 ).save_pretrained(tmp_path / "dino")
        extra = [f"model.align_encoder={tmp_path / 'dino'}", "model.align_layer=1"]
    run = train(tmp_path / mode / "run", synthetic_shards, f"model.base={tiny_llama}", f"model.tower_mode={mode}", *extra)
    out = tmp_path / "export"
    p = convert_here(run, out)
    assert p.returncode == 0, p.stderr[-3000:]
    fusion = json.loads((out / "config.json").read_text())["fusion"]
    assert fusion["tower_mode"] == mode and fusion["align_encoder"] is None
    if extra and "align" in extra[0]:
        from safetensors import safe_open

        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(0 < r["align_loss"] < 2 for r in rows)
        with safe_open(out / "model.safetensors", "pt") as f:
            assert not any("aligner" in k for k in f.keys())
    fused, cfg = zero_reference(run)
    check_round_trip(out, fused, cfg, tmp_path / "load", tiny_llama, text_frozen=mode != "single_tower")


@pytest.mark.slow
def test_stage0_round_trip(tmp_path_factory, tmp_path, tiny_llama, synthetic_shards):
    # DeepSpeed stage 0 (plain data parallelism, the CPU demo's setting) writes one
    # mp_rank_00_model_states.pt and no optimizer partitions. Reference: DeepSpeed's own
    # `module` entry loaded onto the base, strictly (frozen names are the tied head only).
    from megafusion.config import load_config
    from megafusion.model.fusion import LMFusionModel

    run = train(tmp_path_factory.mktemp("z0") / "run", synthetic_shards, f"model.base={tiny_llama}",
                "parallel.zero_stage=0")
    out = tmp_path / "stage0_export"
    p = convert_here(run, out)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = load_config(run / "config.yaml")
    fused = LMFusionModel.from_base(cfg.model.base, cfg.model)
    saved = torch.load(run / "checkpoints" / "global_step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    missing, unexpected = fused.load_state_dict(saved, strict=False)
    assert not unexpected
    assert all(not fused.state_dict(keep_vars=True)[k].requires_grad for k in missing)
    check_round_trip(out, fused, cfg, tmp_path / "load", tiny_llama)


@pytest.mark.slow
def test_pipeline_round_trip(pipeline_run, tmp_path, tiny_base):
    # One tag directory as CHECKPOINT_DIR, fp32 explicitly.
    out = tmp_path / "pipeline_export"
    p = convert_here(pipeline_run / "checkpoints" / "global_step2", out, "--max-shard-size", "2MB", "--dtype", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    check_layout(out, pipeline_run)
    # A tied base's BOI/EOI logit rows were trained apart on the head stage; an untied
    # base has its own head rows from the start.
    tied = json.loads((Path(tiny_base) / "config.json").read_text())["tie_word_embeddings"]
    assert json.loads((out / "config.json").read_text())["untied_image_token_head"] is tied
    fused, cfg = pipeline_reference(pipeline_run)
    check_round_trip(out, fused, cfg, tmp_path / "load", tiny_base)


# ----------------------------------------------------------------------- refusals

def fake_run(root: Path, base: str, tags=("global_step2",), latest="global_step2") -> Path:
    """A run directory laid out as the trainer writes it (empty state files): refusals
    happen before any weight is read."""
    from megafusion.config import load_config, save_resolved

    run = root / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={run}", f"model.base={base}"])
    save_resolved(cfg, run / "config.yaml")
    for tag in tags:
        d = run / "checkpoints" / tag
        d.mkdir(parents=True)
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            (d / name).write_bytes(b"")
    if latest:
        (run / "checkpoints" / "latest").write_text(latest)
    return run


def refused(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]


def convert_here(*args):
    """tools/convert_to_hf.py's main in this process. The real command line runs in
    test_zero3_round_trip and the first refusal; every other export or refusal here
    saves a process start (mostly DeepSpeed's import, ~8 s)."""
    import contextlib
    import io

    from tools.convert_to_hf import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        # main sets it for DeepSpeed's import; later tests' processes must not inherit it.
        mp.delenv("DS_ACCELERATOR", raising=False)
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    refused(convert(tmp_path / "stuff", tmp_path / "out"), "not a checkpoint", "stuff")  # the real CLI
    refused(convert_here(tmp_path / "missing", tmp_path / "out"), "no such directory")
    assert not (tmp_path / "out").exists()


def test_refuses_a_missing_tag(tmp_path, tiny_llama):
    run = fake_run(tmp_path, tiny_llama, tags=("global_step1", "global_step2"))
    refused(convert_here(run, tmp_path / "out", "--tag", "global_step7"), "global_step7", "global_step2")
    refused(convert_here(run / "checkpoints" / "global_step1", tmp_path / "out", "--tag", "global_step2"),
            "global_step1", "global_step2")
    run2 = fake_run(tmp_path / "b", tiny_llama, latest=None)
    refused(convert_here(run2 / "checkpoints", tmp_path / "out"), "no complete checkpoint")


def test_finds_checkpoints_as_the_trainer_lays_them_out(tmp_path, tiny_llama):
    from megafusion.checkpoint_reader import find_checkpoint

    run = fake_run(tmp_path, tiny_llama, tags=("global_step1", "global_step2"), latest="global_step1")
    for path in (run, run / "checkpoints"):
        ref = find_checkpoint(path)
        assert (ref.run_dir, ref.tag, ref.kind) == (run, "global_step1", "zero")  # what `latest` names
        assert find_checkpoint(path, "global_step2").tag == "global_step2"
    assert find_checkpoint(run / "checkpoints" / "global_step2").tag == "global_step2"


def test_refuses_a_base_model_that_cannot_be_found(tmp_path):
    run = fake_run(tmp_path, "/nonexistent/llama-base")
    refused(convert_here(run, tmp_path / "out"), "/nonexistent/llama-base")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_out_dir(tmp_path, tiny_llama):
    run = fake_run(tmp_path, tiny_llama)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    refused(convert_here(run, out), "not empty", "--overwrite")
    refused(convert_here(run, run, "--overwrite"), "run directory")
    refused(convert_here(run, tmp_path / "new", "--max-shard-size", "lots"), "--max-shard-size")
    assert (out / "model.safetensors").read_text() == "precious"


# ------------------------------------------------------------------------ SmolLM2

@pytest.mark.slow
def test_smollm2_demo_export_keeps_the_base_model(tmp_path_factory, synthetic_shards):
    """configs/demo.yaml (SmolLM2-135M) trained 2 steps on one rank (short sequences),
    exported: text-only logits and the greedy continuation are SmolLM2's."""
    from megafusion.model.loading import load_tokenizer

    root = tmp_path_factory.mktemp("smol")
    run = train(root / "run", synthetic_shards, "data.seq_len=160", "data.val=null", "data.num_workers=0",
                "log.sample_every=0", "log.val_every=0", "train.micro_batch_size=1", ranks=1,
                config="configs/demo.yaml")
    out = root / "export"
    p = convert_here(run, out)
    assert p.returncode == 0, p.stderr[-3000:]
    from megafusion.config import load_config

    tok = load_tokenizer("smollm2")
    cfg = load_config(run / "config.yaml")
    inputs = fixed_inputs(cfg.model, 49152)
    inputs["text_ids"] = torch.tensor([tok("The capital of France is").input_ids])
    inputs["prompt_ids"] = inputs["text_ids"]
    # The round trip against the trainer's model is the tiny runs' job; here: SmolLM2.
    got = check_round_trip(out, None, cfg, root / "load", "smollm2", inputs)[0]
    assert "Paris" in tok.decode(got["greedy"][inputs["prompt_ids"].shape[1]:])
