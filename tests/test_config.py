"""Run configs: YAML -> typed dataclasses, overrides, errors, DeepSpeed dicts, lr schedule."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from megafusion.config import (
    ConfigError,
    RunConfig,
    TrainSection,
    config_from_dict,
    config_to_dict,
    load_config,
    lr_at,
    lr_multiplier,
    save_resolved,
)
from megafusion.parallel.ds_config import deepspeed_config, optimizer_offloaded

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TINY = REPO / "configs" / "tiny.yaml"


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "data:\n  train: /shards\n"


# --------------------------------------------------------------------------- shipped configs


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "demo.yaml", "llama3_8b.yaml", "llama3_70b.yaml"} <= names
    assert {p.name for p in DS_CONFIGS} >= {"zero3.json", "zero3_offload.json", "pipeline_zero1.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.batch_size == cfg.train.micro_batch_size
    saved = save_resolved(cfg, tmp_path / "config.yaml")
    assert load_config(saved) == cfg
    # Every shipped config yields a DeepSpeed dict for one node.
    ds = deepspeed_config(cfg, cfg.parallel.pipeline_stages * 2)
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


def test_demo_and_tiny_shapes():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.model.base == "smollm2"
    assert (demo.model.image_mode, demo.model.image_size, demo.model.patch_size, demo.model.patcher) == ("pixel", 16, 4, "linear")
    assert (demo.model.image_size // demo.model.patch_size) ** 2 == 16
    # 8 samples of ~30 tokens (16 image tokens, BOI/EOI, BOS/EOS, a caption) fill one row
    assert demo.data.samples_per_step == 8 and demo.data.seq_len == 256 and demo.model.pixel_scale == 5.0
    tiny = load_config(TINY)
    assert tiny.train.dtype == "fp32" and tiny.parallel.zero_stage == 3
    assert tiny.model.base.endswith("tiny-llama") and "$" not in tiny.model.base and "~" not in tiny.model.base


# LMFusion (arXiv 2412.15188), as recorded in /work/shared/PAPERS.md.
PAPER = dict(lr=1e-4, text_lr=0.0, betas=(0.9, 0.95), eps=1e-8, warmup_steps=4000, min_lr=1.5e-5, schedule="cosine")


@pytest.mark.parametrize("name", ["llama3_8b.yaml", "llama3_70b.yaml"])
def test_llama3_configs_carry_lmfusion_recipe(name):
    cfg = load_config(REPO / "configs" / name)
    for key, value in PAPER.items():
        assert getattr(cfg.train, key) == value, key
    assert cfg.data.seq_len == 4096
    assert cfg.model.diffusion_loss_weight == 5.0
    assert cfg.model.train_text_tower is False
    assert cfg.model.objective == "ddpm" and cfg.model.num_train_timesteps == 1000
    assert cfg.model.image_size == 256 and cfg.model.image_mode == "vae"
    assert cfg.model.patcher == "unet" and cfg.model.patch_size == 2
    assert (256 // 8 // 2) ** 2 == 256  # 8x VAE, 2x2 patches: 256 tokens per image
    assert cfg.data.generation_ratio == 0.8
    assert cfg.train.dtype == "bf16" and cfg.parallel.zero_stage == 3
    assert cfg.model.activation_checkpointing


def test_llavafusion_config_carries_the_recipe_on_a_frozen_vlm():
    """LLaVAFusion: LMFusion's recipe (configs/llama3_8b.yaml's) on LLaVA-NeXT 8B, text-to-image
    rows only, born partitioned (parallel.zero_init) as configs/llama3_8b.yaml."""
    cfg = load_config(REPO / "configs" / "llavafusion_8b.yaml")
    ref = load_config(REPO / "configs" / "llama3_8b.yaml")
    for key, value in PAPER.items():
        assert getattr(cfg.train, key) == value, key
    assert cfg.model == dataclasses.replace(ref.model, base=cfg.model.base)
    assert "llava-next" in cfg.model.base and cfg.data.generation_ratio == 1.0
    assert cfg.parallel == ref.parallel


def test_llama3_base_paths_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA3_70B", str(tmp_path / "llama70"))
    monkeypatch.setenv("VAE_PATH", str(tmp_path / "vae"))
    cfg = load_config(REPO / "configs" / "llama3_70b.yaml")
    assert cfg.model.base == str(tmp_path / "llama70")
    assert cfg.model.vae_path == str(tmp_path / "vae")


# --------------------------------------------------------------------------- overrides


def test_overrides_nested_fields_and_types():
    cfg = load_config(TINY, [
        "train.steps=12",
        "train.lr=3e-4",               # no dot: still a float
        "train.min_lr=0",              # int into a float field
        "train.betas=[0.8, 0.99]",
        "train.steps=1e3",             # an integral float into an int field
        "model.patch_size=2",
        "model.vae_path=null",
        "model.extra.note=hello",
        "log.tensorboard=false",
        "log.sample_prompts=[a red circle, a blue square]",
        "run.name=2024",               # str fields keep the text
        "run.dir=/tmp/run=1",          # '=' inside the value
        "data.train=s3://bucket/shards",
        "data.val=null",
    ])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == 0.0 and isinstance(cfg.train.min_lr, float)
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.model.patch_size == 2 and cfg.model.vae_path is None
    assert cfg.model.extra == {"note": "hello"}
    assert cfg.log.tensorboard is False
    assert cfg.log.sample_prompts == ["a red circle", "a blue square"]
    assert cfg.run.name == "2024" and cfg.run.dir == "/tmp/run=1"
    assert cfg.data.train == "s3://bucket/shards" and cfg.data.val is None


def test_override_stream_mix():
    cfg = load_config(TINY, ["data.train=[{remote: /a, proportion: 0.7}, {remote: s3://b/c, proportion: 0.3}]"])
    streams = cfg.data.train_streams()
    assert [(s.remote, s.proportion) for s in streams] == [("/a", 0.7), ("s3://b/c", 0.3)]


def test_micro_batch_size_is_the_data_batch_size(tmp_path):
    assert load_config(TINY, ["train.micro_batch_size=5"]).data.batch_size == 5
    message = one_line_error(load_config, TINY, ["data.batch_size=5"])
    assert "data.batch_size" in message and "train.micro_batch_size" in message
    path = write(tmp_path, "data:\n  train: /shards\n  batch_size: 3\n")
    assert "train.micro_batch_size" in one_line_error(load_config, path)


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_yaml(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  stesp: 3\n")
    message = one_line_error(load_config, path)
    assert "train.stesp" in message and str(path) in message
    assert "valid:" in message and "steps" in message and "micro_batch_size" in message

    message = one_line_error(load_config, write(tmp_path, MINIMAL + "trian:\n  steps: 3\n"))
    assert "trian" in message and "train" in message and "parallel" in message

    message = one_line_error(load_config, write(tmp_path, MINIMAL + "model:\n  patchsize: 3\n"))
    assert "model.patchsize" in message and "patch_size" in message


def test_unknown_key_on_command_line():
    message = one_line_error(load_config, TINY, ["train.stesp=3"])
    assert message.startswith("unknown config key train.stesp (valid: steps, ")
    assert "trian" in one_line_error(load_config, TINY, ["trian.steps=3"])
    assert "parallel.zero_stag" in one_line_error(load_config, TINY, ["parallel.zero_stag=1"])
    assert "train.steps is not a section" in one_line_error(load_config, TINY, ["train.steps.x=1"])
    assert "section.field=value" in one_line_error(load_config, TINY, ["=3"])
    assert "not valid YAML" in one_line_error(load_config, TINY, ["train.betas=[0.9"])
    assert "section" in one_line_error(load_config, TINY, ["train=3"])
    assert "section.field=value" in one_line_error(load_config, TINY, ["train.steps"])


@pytest.mark.parametrize("override, key, expected", [
    ("train.steps=abc", "train.steps", "int"),
    ("train.steps=0.5", "train.steps", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("log.tensorboard=maybe", "log.tensorboard", "bool"),
    ("log.tensorboard=1", "log.tensorboard", "bool"),
    ("train.betas=[0.9]", "train.betas", "list of 2"),
    ("train.betas=0.9", "train.betas", "list of 2"),
    ("model.image_size=[32]", "model.image_size", "int"),
    ("run.name=null", "run.name", "str"),
])
def test_wrong_type_on_command_line(override, key, expected):
    message = one_line_error(load_config, TINY, [override])
    assert key in message and expected in message


def test_wrong_type_in_yaml(tmp_path):
    message = one_line_error(load_config, write(tmp_path, MINIMAL + "train:\n  warmup_steps: soon\n"))
    assert "train.warmup_steps" in message and "int" in message
    message = one_line_error(load_config, write(tmp_path, MINIMAL + "train: 3\n"))
    assert "train" in message and "mapping" in message


def test_bad_files(tmp_path):
    assert "missing.yaml" in one_line_error(load_config, tmp_path / "missing.yaml")
    message = one_line_error(load_config, write(tmp_path, "train:\n  steps: [1, 2\n"))
    assert "invalid YAML" in message
    message = one_line_error(load_config, write(tmp_path, MINIMAL + "train:\n  steps: 1\n  steps: 2\n"))
    assert "'steps' written twice" in message and "line 5" in message


@pytest.mark.parametrize("override, words", [
    ("train.dtype=fp16", ["train.dtype", "bf16", "fp32"]),
    ("train.schedule=step", ["train.schedule", "cosine"]),
    ("model.patcher=conv", ["model.patcher", "linear", "unet"]),
    ("train.steps=0", ["train.steps"]),
    ("train.min_lr=1", ["train.min_lr"]),
    ("train.text_lr=1e-5", ["train.text_lr", "model.train_text_tower"]),
    ("model.train_text_tower=true", ["model.train_text_tower", "train.text_lr"]),
    ("parallel.ds_config=ds_configs/nope.json", ["parallel.ds_config", "nope.json"]),
    ("data.train=", ["data.train"]),
])
def test_invalid_values(override, words):
    message = one_line_error(load_config, TINY, [override])
    for word in words:
        assert word in message


@pytest.mark.parametrize("value", ["nevr", "Never", "runs/old/checkpoints/global_step100"])
def test_run_resume_is_auto_or_never(value, tmp_path):
    """Anything else was taken as auto: a typo, or a checkpoint path (documented, never
    implemented), resumed from run.dir's own `latest` instead."""
    message = one_line_error(load_config, TINY, [f"run.resume={value}"])
    assert f"run.resume={value!r}" in message and "auto or never" in message, message
    # A directory that exists is no exception.
    (tmp_path / "global_step5").mkdir()
    message = one_line_error(load_config, TINY, [f"run.resume={tmp_path / 'global_step5'}"])
    assert "auto or never" in message and "latest" in message, message
    for ok in ("auto", "never"):
        assert load_config(TINY, [f"run.resume={ok}"]).run.resume == ok


def test_pipeline_with_zero3_is_refused():
    message = one_line_error(load_config, TINY, ["parallel.pipeline_stages=2"])
    assert "parallel.pipeline_stages=2" in message and "parallel.zero_stage" in message
    assert "pipeline_zero1.json" in message
    cfg = load_config(TINY, ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                             "parallel.ds_config=ds_configs/pipeline_zero1.json"])
    assert cfg.parallel.pipeline_stages == 2


# --------------------------------------------------------------------------- environment


def test_environment_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MF_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("MF_TEST_STEPS", "17")
    monkeypatch.delenv("MF_TEST_UNSET", raising=False)
    monkeypatch.setenv("MF_TEST_EMPTY", "")
    path = write(tmp_path, (
        "run:\n  dir: ${MF_TEST_ROOT}/run\n  name: ${MF_TEST_UNSET:-fallback}\n"
        "data:\n  val: ${MF_TEST_UNSET:-~/shards}\n  run_id: ${MF_TEST_EMPTY:-~}\n"
        "  cache_root: ${MF_TEST_EMPTY-kept-empty}x\n"
        "  train:\n    - {remote: \"${MF_TEST_ROOT}/a\", proportion: 0.5}\n    - remote: ${MF_TEST_ROOT}/b\n      proportion: 0.5\n"
        "train:\n  steps: ${MF_TEST_STEPS}\n  warmup_steps: ${MF_TEST_UNSET:-3}\n"
        "model:\n  extra: {where: \"${MF_TEST_ROOT}\"}\n"
    ))
    cfg = load_config(path, ["checkpoint.every=${MF_TEST_STEPS}", "log.sample_prompts=[${MF_TEST_UNSET:-a cat}]"])
    assert cfg.run.dir == f"{tmp_path}/run"
    assert cfg.run.name == "fallback"
    assert cfg.data.val == os.path.expanduser("~/shards") and not cfg.data.val.startswith("~")
    assert cfg.data.run_id == os.path.expanduser("~")
    assert [s.remote for s in cfg.data.train_streams()] == [f"{tmp_path}/a", f"{tmp_path}/b"]
    assert cfg.data.cache_root == "x"  # ${VAR-default} keeps a set-but-empty value
    assert cfg.train.steps == 17 and cfg.train.warmup_steps == 3
    assert cfg.checkpoint.every == 17
    assert cfg.log.sample_prompts == ["a cat"]
    assert cfg.model.extra == {"where": str(tmp_path)}


def test_unset_environment_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MF_TEST_UNSET", raising=False)
    path = write(tmp_path, "data:\n  train: ${MF_TEST_UNSET}/shards\n")
    message = one_line_error(load_config, path)
    assert "data.train" in message and "MF_TEST_UNSET" in message
    message = one_line_error(load_config, TINY, ["run.dir=${MF_TEST_UNSET}"])
    assert "run.dir" in message and "MF_TEST_UNSET" in message


# --------------------------------------------------------------------------- DeepSpeed


class _Grid:
    """Stands in for the pipeline engine's process grid (data-parallel size only)."""

    def __init__(self, data_parallel: int):
        self.data_parallel = data_parallel

    def get_data_parallel_world_size(self):
        return self.data_parallel


def accepted_by_deepspeed(ds: dict, world_size: int, data_parallel: int, monkeypatch):
    from deepspeed.runtime import config as ds_config_module

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ds_config_module.dist, "get_world_size", lambda group=None: world_size)
    mpu = _Grid(data_parallel) if data_parallel != world_size else None
    parsed = ds_config_module.DeepSpeedConfig(json.loads(json.dumps(ds)), mpu=mpu)
    assert parsed.world_size == data_parallel
    return parsed


@pytest.mark.parametrize("world_size, stages, zero, ds_file, dtype", [
    (1, 1, 3, "zero3.json", "fp32"),
    (2, 1, 3, "zero3.json", "bf16"),
    (2, 1, 3, "zero3_offload.json", "bf16"),
    (4, 2, 1, "pipeline_zero1.json", "bf16"),
    (2, 2, 1, "pipeline_zero1.json", "fp32"),
])
def test_deepspeed_config_fills_and_is_accepted(world_size, stages, zero, ds_file, dtype, monkeypatch):
    cfg = load_config(TINY, [
        "train.micro_batch_size=3", "train.gradient_accumulation=5", "train.grad_clip=0.5",
        f"train.dtype={dtype}", f"parallel.zero_stage={zero}", f"parallel.pipeline_stages={stages}",
        f"parallel.ds_config=ds_configs/{ds_file}",
    ])
    ds = deepspeed_config(cfg, world_size)
    data_parallel = world_size // stages
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * data_parallel
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (dtype == "bf16") and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == zero
    assert "optimizer" not in ds and "scheduler" not in ds
    assert not any(str(k).startswith("_") for k in ds)
    assert optimizer_offloaded(ds) is (ds_file == "zero3_offload.json")

    parsed = accepted_by_deepspeed(ds, world_size, data_parallel, monkeypatch)
    assert parsed.train_batch_size == 3 * 5 * data_parallel
    assert parsed.gradient_accumulation_steps == 5
    assert parsed.zero_optimization_stage == zero
    assert parsed.bfloat16_config.enabled is (dtype == "bf16")
    assert parsed.gradient_clipping == 0.5


def test_shipped_ds_jsons_write_nothing_the_run_config_owns():
    for path in DS_CONFIGS:
        raw = json.loads(path.read_text())
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16"):
            assert key not in raw, (path.name, key)
        assert "stage" not in raw.get("zero_optimization", {}), path.name


def test_world_size_must_be_a_multiple_of_pipeline_stages():
    cfg = load_config(TINY, ["parallel.pipeline_stages=2", "parallel.zero_stage=1",
                             "parallel.ds_config=ds_configs/pipeline_zero1.json"])
    message = one_line_error(deepspeed_config, cfg, 3)
    assert "3" in message and "parallel.pipeline_stages=2" in message


@pytest.mark.parametrize("written, key", [
    ({"train_batch_size": 8}, "train_batch_size"),
    ({"train_micro_batch_size_per_gpu": 1}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
])
def test_ds_json_writing_an_owned_key_is_refused(written, key, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, **written}))
    cfg = load_config(TINY, [f"parallel.ds_config={path}"])
    message = one_line_error(deepspeed_config, cfg, 2)
    assert key in message and str(path) in message


def test_bad_ds_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"overlap_comm": true,}}')
    cfg = load_config(TINY, [f"parallel.ds_config={path}"])
    assert "ds.json" in one_line_error(deepspeed_config, cfg, 1)
    path.write_text('{"wall_clock_breakdown": false, "wall_clock_breakdown": true}')
    assert "duplicate" in one_line_error(deepspeed_config, cfg, 1)


# --------------------------------------------------------------------------- lr schedule


def brute_force_lr(step, peak, floor, warmup, total, schedule="cosine"):
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    t = min(1.0, (step - warmup) / (total - warmup))
    if schedule == "linear":
        return floor + (peak - floor) * (1 - t)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_brute_force(schedule):
    train = TrainSection(steps=1000, warmup_steps=100, lr=1e-4, min_lr=1.5e-5, text_lr=2e-5, schedule=schedule)
    for step in range(0, 1101):
        expected = brute_force_lr(step, 1e-4, 1.5e-5, 100, 1000, schedule)
        assert lr_at(step, train) == pytest.approx(expected, rel=1e-12, abs=1e-18), step
        # The text tower follows the same shape, scaled to its own peak.
        assert lr_at(step, train, train.text_lr) == pytest.approx(expected * 2e-5 / 1e-4, rel=1e-12), step


def test_lr_schedule_landmarks():
    train = TrainSection(steps=250000, warmup_steps=4000, lr=1e-4, min_lr=1.5e-5)
    assert lr_at(0, train) == pytest.approx(1e-4 / 4000)
    assert lr_at(3999, train) == pytest.approx(1e-4)  # peak at the end of warmup
    assert lr_at(4000, train) == pytest.approx(1e-4)
    assert lr_at(250000, train) == pytest.approx(1.5e-5)  # ends at min_lr
    assert lr_at(10**7, train) == pytest.approx(1.5e-5)
    decay = [lr_at(s, train) for s in range(4000, 250001, 1000)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(127000, train) == pytest.approx((1e-4 + 1.5e-5) / 2)  # cosine midpoint
    assert lr_at(5, TrainSection(steps=10, warmup_steps=0, lr=1.0, min_lr=0.0)) == pytest.approx(0.5)


def test_lr_multiplier_drives_lambda_lr():
    import torch

    train = TrainSection(steps=20, warmup_steps=5, lr=1e-3, min_lr=1e-4, text_lr=1e-5)
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": train.lr}, {"params": [params[1]], "lr": train.text_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, train))
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, train))
        assert opt.param_groups[1]["lr"] == pytest.approx(lr_at(step, train, train.text_lr))
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- misc


def test_config_to_dict_is_plain_and_from_dict_round_trips():
    cfg = load_config(TINY)
    data = config_to_dict(cfg)
    assert data["train"]["betas"] == [0.9, 0.95]
    json.dumps(data)
    del data["data"]["batch_size"]
    assert config_from_dict(data) == cfg


def test_config_from_dict_requires_data_train():
    assert "data.train" in one_line_error(config_from_dict, {})
    assert config_from_dict({"data": {"train": "/shards"}}).train.betas == (0.9, 0.95)


def _tiny_tool():
    spec = importlib.util.spec_from_file_location("make_tiny_llama", REPO / "tools" / "make_tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_tiny_llama(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    tool = _tiny_tool()
    out = tool.make_tiny_llama(tmp_path / "tiny", seed=0)
    assert tool.make_tiny_llama(out, seed=0) == out  # idempotent
    with pytest.raises(SystemExit):
        tool.make_tiny_llama(out, seed=1)
    other = tool.make_tiny_llama(tmp_path / "tiny-again", seed=0)
    a, b = load_file(out / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # deterministic

    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (64, 2, 4, 2)
    assert config.rope_scaling["rope_type"] == "llama3" and config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert config.vocab_size == len(tokenizer) == 49152
    model = LlamaForCausalLM.from_pretrained(out)
    ids = torch.tensor([tokenizer("a red circle").input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], 49152)

    cfg = load_config(TINY, [f"model.base={out}"])
    assert cfg.model.base == str(out)


def test_x_fusion_designs_default_to_x_fusions_recipe(tmp_path):
    """A run whose model.tower_mode is one of X-Fusion's designs takes X-Fusion's recipe
    (rectified flow, linear 2x2 patches, 0.2 AR + 1.0 diffusion, clean condition images,
    2:1 generation:understanding) where neither its YAML nor its overrides say otherwise;
    lmfusion keeps the field defaults. tools/ablate.py's pins keep a config's recipe."""
    from megafusion.config import XFUSION_DEFAULTS, config_from_dict
    from megafusion.eval.ablate import pinned_recipe

    data = {"model": {"base": "x", "patch_size": 4}, "data": {"train": "d"}}
    lm = config_from_dict(data)
    assert (lm.model.objective, lm.model.lm_loss_weight, lm.model.diffusion_loss_weight) == ("ddpm", 1.0, 5.0)
    for mode in ("dual_tower", "xfuse", "gated_tower", "single_tower"):
        extra = ["model.train_text_tower=true", "train.text_lr=1e-4"] if mode == "single_tower" else []
        cfg = config_from_dict(data, [f"model.tower_mode={mode}", "model.diffusion_loss_weight=2.0", *extra])
        m = cfg.model
        assert (m.objective, m.patcher, m.lm_loss_weight, m.condition_clean_share) == ("rectified_flow", "linear", 0.2, 1.0)
        assert cfg.data.generation_ratio == 0.667
        assert m.patch_size == 4 and m.diffusion_loss_weight == 2.0  # set by the YAML / an override: kept
        pinned = config_from_dict(data, [f"model.tower_mode={mode}", *pinned_recipe(lm, []), *extra])
        for key in XFUSION_DEFAULTS:
            section, name = key.split(".")
            assert getattr(getattr(pinned, section), name) == getattr(getattr(lm, section), name), key


@pytest.mark.parametrize("override, words", [
    ("data.train=[{remote: /a, proportion: 0.5}, {remote: /b}]", ["data.train[1].proportion", "every stream"]),
    ("data.train=[{remote: /a}, {remote: /b, proportion: 0.5}]", ["data.train[0].proportion", "every stream"]),
    ("data.train=[{remote: /a, proportion: -1.0}, {remote: /b, proportion: 1.0}]", ["data.train[0].proportion", "> 0"]),
    ("data.train=[{remote: /a, proportion: 0.7}, {remote: /b, proportion: 0}]", ["data.train[1].proportion", "> 0"]),
    ("data.train=[{remote: /a, proportion: .nan}]", ["data.train[0].proportion"]),
    ("data.train=[{remote: /a, proportion: lots}]", ["data.train[0].proportion"]),
    ("data.val=[{remote: /v, proportion: 1.0}, {remote: /w}]", ["data.val[1].proportion"]),
])
def test_stream_proportions_all_or_none_and_positive(override, words):
    """streaming mixes streams only when every one has a proportion > 0 or none has: the
    config says so before a model is built."""
    message = one_line_error(load_config, TINY, [override])
    for word in words:
        assert word in message


def test_stream_proportions_given_for_all_or_none_are_accepted():
    for value in ("[{remote: /a, proportion: 0.7}, {remote: /b, proportion: 3}]", "[{remote: /a}, {remote: /b}]"):
        streams = load_config(TINY, [f"data.train={value}"]).data.train_streams()
        assert [s.remote for s in streams] == ["/a", "/b"]
