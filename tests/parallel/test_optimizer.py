"""The optimiser the engine builds: its parameter groups (which parameters decay) and
which AdamW implementation steps them.

References: a rule written on parameter *names* (the engine decides by module type and
shape), and, for the offloaded optimiser, a run of the same config with torch's AdamW."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from param_groups_worker import describe  # noqa: E402


# --------------------------------------------------------------------------- decision


@pytest.mark.parametrize("offloaded,device,expect", [
    (True, "cpu", "cpu_adam"),
    (True, "cuda", "cpu_adam"),  # states on the host: the step runs there whatever the GPU
    (False, "cuda", "fused"),
    (False, "xpu", "foreach"),
    (False, "cpu", "fused"),
])
def test_choose_optimizer(offloaded, device, expect):
    from megafusion.parallel.engine import choose_optimizer

    assert choose_optimizer(offloaded, device) == expect


@pytest.mark.parametrize("device,fused,foreach", [("cuda", True, None), ("xpu", None, True), ("cpu", True, None)])
def test_build_optimizer_without_offload_on_each_device(device, fused, foreach):
    """What build_optimizer makes of a fake device (construction only: torch checks
    fused kernels' devices at the first step)."""
    import torch

    from megafusion.config import load_config
    from megafusion.parallel.engine import build_optimizer

    cfg = load_config(TINY)
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = build_optimizer([{"params": [p]}], cfg, {"zero_optimization": {"stage": 3}}, device_type=device)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["fused"] == fused and opt.defaults["foreach"] == foreach


def test_cpu_optimizer_steps_like_the_per_tensor_loop():
    """The CPU's fused AdamW really steps on the CPU, and as torch's reference loop does
    (same update to rounding), with the run's betas, eps and weight decay."""
    import torch

    from megafusion.config import load_config
    from megafusion.parallel.engine import build_optimizer

    cfg = load_config(TINY, ["train.weight_decay=0.1"])
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 32, generator=g), torch.randn(32, generator=g)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    opt = build_optimizer([{"params": ours}], cfg, {"zero_optimization": {"stage": 0}}, device_type="cpu")
    ref_opt = torch.optim.AdamW(ref, lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps,
                                weight_decay=0.1, foreach=False)
    for step in grads:
        for p, q, gr in zip(ours, ref, step):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref_opt.step()
    for p, q, t in zip(ours, ref, start):
        assert not torch.equal(p, t)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- weight decay


def decays_by_name(name: str) -> bool:
    """Brute force on names: no decay for biases, anything inside a *norm* module, the
    token embedding table, the image position table and the BOI/EOI rows
    (image_token_embed, image_token_head)."""
    parts = name.split(".")
    owner = parts[-2] if len(parts) > 1 else ""
    if parts[-1] == "bias" or "norm" in owner or owner == "embed_tokens":
        return False
    if name in ("image_tokenizer.embedder.position", "image_tokenizer.predictor.position"):
        return False
    return name not in ("image_token_embed", "image_token_head")


def check_groups(described: dict, weight_decay: float) -> None:
    groups, trainable = described["groups"], described["trainable"]
    seen = [n for g in groups.values() for n in g["params"]]
    assert sorted(seen) == trainable, "each trainable parameter in exactly one group"
    for g in groups.values():
        for name in g["params"]:
            want = weight_decay if decays_by_name(name) else 0.0
            assert g["weight_decay"] == want, (name, g["weight_decay"], want)
    # The rule has both outcomes here (otherwise the comparison above proves little).
    assert any(decays_by_name(n) for n in trainable) and not all(decays_by_name(n) for n in trainable)


@pytest.mark.parametrize("extra", [
    ["model.patcher=linear"],
    ["model.patcher=unet"],
    ["model.image_position=learned"],
    ["model.patcher_layers=1", "model.image_position=learned"],
    ["model.train_text_tower=true", "train.text_lr=1e-4"],  # tied embedding + LM head trainable
])
def test_weight_decay_groups_follow_name_rule(tiny_llama, extra):
    from megafusion.config import load_config

    cfg = load_config(TINY, ["train.weight_decay=0.1", *extra])
    described = describe(cfg)
    check_groups(described, 0.1)
    assert "image_token_embed" in described["trainable"]


def test_patcher_layers_train_at_their_own_lr(tiny_llama):
    """model.patcher_layers' blocks (every parameter under a `.blocks.` of the image
    tokenizer, by name) and nothing else train at train.patcher_layers_lr; the rest of
    the image side at train.lr."""
    from megafusion.config import load_config

    cfg = load_config(TINY, ["train.weight_decay=0.1", "model.patcher_layers=1", "train.lr=1e-3",
                             "train.patcher_layers_lr=3e-5"])
    described = describe(cfg)
    check_groups(described, 0.1)
    blocks = sorted(n for n in described["trainable"] if n.startswith(("image_tokenizer.embedder.blocks.",
                                                                       "image_tokenizer.predictor.blocks.")))
    assert any(".predictor.blocks.time." in n for n in blocks) and any(".embedder.blocks." in n for n in blocks)
    at_block_lr = sorted(n for g in described["groups"].values() if g["lr"] == 3e-5 for n in g["params"])
    assert at_block_lr == blocks
    assert all(g["lr"] == 1e-3 for g in described["groups"].values() if g["lr"] != 3e-5)
    with pytest.raises(Exception, match="patcher_layers_lr"):
        load_config(TINY, ["train.patcher_layers_lr=0"])


def test_weight_decay_spares_untied_boi_eoi_head_rows(tiny_llama_untied):
    from megafusion.config import load_config

    cfg = load_config(TINY, ["train.weight_decay=0.1", f"model.base={tiny_llama_untied}",
                             "model.train_text_tower=true", "train.text_lr=1e-4"])
    described = describe(cfg)
    check_groups(described, 0.1)
    assert {"image_token_head", "lm_head.weight"} <= set(described["trainable"])


@pytest.mark.slow
def test_weight_decay_groups_under_zero_init(tiny_llama):
    """parallel.zero_init (the 8B/70B configs) hands the engine partitioned parameters
    whose .data is an empty 1-D placeholder: the rule must see their real shapes."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, str(REPO / "tests/parallel/param_groups_worker.py"), TINY,
                          "parallel.zero_init=true", "model.patcher=unet", "train.weight_decay=0.1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("GROUPS "))
    check_groups(json.loads(line[len("GROUPS "):]), 0.1)


# --------------------------------------------------------------------------- offload


def train_one_rank(tmp_path: Path, shards: str, ds_config: str, steps: int = 4) -> tuple[str, list[dict]]:
    run_dir = tmp_path / Path(ds_config).stem
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               PYTHONUNBUFFERED="1")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, str(REPO / "tests/parallel/trainer_worker.py"), TINY, f"run.dir={run_dir}",
                          f"data.train={shards}", f"data.run_id={run_dir.name}-{os.getpid()}", f"train.steps={steps}",
                          "log.tensorboard=false", "checkpoint.every=0", f"parallel.ds_config={ds_config}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return text, rows


@pytest.mark.slow
def test_offload_config_steps_with_deepspeed_cpu_adam(tmp_path, tiny_llama, synthetic_shards):
    """ds_configs/zero3_offload.json: the engine's ZeRO-3 optimizer steps DeepSpeedCPUAdam
    (its C++ op JIT-compiled here on first use), and the run trains as torch's AdamW
    does on ds_configs/zero3.json: same losses to float rounding."""
    text, offloaded = train_one_rank(tmp_path, synthetic_shards, "ds_configs/zero3_offload.json")
    assert ("ENGINE_OPTIMIZER deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam wrapped_by "
            "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3") in text, text[-3000:]
    text, reference = train_one_rank(tmp_path, synthetic_shards, "ds_configs/zero3.json")
    assert "ENGINE_OPTIMIZER torch.optim.adamw.AdamW" in text, text[-3000:]
    assert [r["step"] for r in offloaded] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for a, b in zip(offloaded, reference):
        for key in ("loss", "lm_loss", "diffusion_loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (a["step"], key, a[key], b[key])
    assert offloaded[-1]["diffusion_loss"] < offloaded[0]["diffusion_loss"]


# --------------------------------------------------------------------------- train.optimizer


@pytest.mark.parametrize("choice,offload,device,expect", [
    ("auto", False, "cpu", "fused"),
    ("torch_fused", False, "cuda", "fused"),
    ("deepspeed_fused", False, "cuda", "deepspeed_fused"),
    ("apex_fused", False, "cuda", "apex_fused"),
    ("cpu_adam", True, "cuda", "cpu_adam"),
    ("deepspeed_fused", False, "cpu", "error: train.optimizer=deepspeed_fused is a CUDA kernel"),
    ("apex_fused", True, "cuda", "error: train.optimizer=apex_fused is a CUDA kernel; the optimizer states here live "
                                 "offloaded to the CPU"),
    ("cpu_adam", False, "cuda", "error: train.optimizer=cpu_adam steps optimizer states offloaded"),
])
def test_explicit_optimizer_choice(choice, offload, device, expect):
    from megafusion.config import load_config
    from megafusion.parallel.engine import optimizer_kind

    cfg = load_config(TINY, [f"train.optimizer={choice}"])
    ds = {"zero_optimization": {"stage": 3, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}}
    if expect.startswith("error"):
        with pytest.raises(SystemExit) as info:
            optimizer_kind(cfg, ds, device)
        assert str(info.value).startswith(expect) and "\n" not in str(info.value)
    else:
        assert optimizer_kind(cfg, ds, device) == expect


def test_apex_fused_adam_is_built_with_the_run_settings_or_refused_in_one_line(apex_stand_in, monkeypatch):
    """With apex importable (a stand-in recording its arguments: apex needs CUDA to
    build), build_optimizer hands it the groups and AdamW's settings in apex's AdamW mode;
    without apex it stops with one line naming the option and where apex comes from."""
    import torch

    from megafusion.config import load_config
    from megafusion.parallel.engine import build_optimizer

    class StandInFusedAdam(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode=True, **kw):
            self.adam_w_mode, self.kw = adam_w_mode, kw
            super().__init__(params, **kw)

    apex_stand_in(optimizers={"FusedAdam": StandInFusedAdam})
    cfg = load_config(TINY, ["train.optimizer=apex_fused", "train.weight_decay=0.1"])
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([{"params": [p]}], cfg, {"zero_optimization": {"stage": 3}}, device_type="cuda")
    assert type(opt) is StandInFusedAdam and opt.adam_w_mode is True
    assert opt.kw == dict(lr=cfg.train.lr, betas=tuple(cfg.train.betas), eps=cfg.train.eps, weight_decay=0.1)

    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.delitem(sys.modules, "apex.optimizers")
    with pytest.raises(SystemExit) as info:
        build_optimizer([{"params": [p]}], cfg, {"zero_optimization": {"stage": 3}}, device_type="cuda")
    assert "train.optimizer=apex_fused" in str(info.value) and "github.com/NVIDIA/apex" in str(info.value)
