#!/usr/bin/env python
"""The GPU path checked on one GPU, or its dry run on the CPU.

    python tools/gpu_check.py [--wheels DIR] [--out FILE]   on a machine with a CUDA GPU
    python tools/gpu_check.py --cpu [--out FILE]            the same code paths, tiny, on the CPU
    python tools/gpu_check.py --build-wheels DIR            wheelhouse for an offline GPU machine

Five independent checks: one that raises is recorded with its exception and the others
still run. One JSON object on stdout (and --out, rewritten after each check so that a run
killed at its time limit keeps what finished), progress on stderr, exit status 0 when
every check passed. About 8 minutes on one H200 for the first four; qwz, last, adds two
short runs and the JIT build of DeepSpeed's quantizer kernel.

  attention   sdpa, flex and the flash decomposition against float64 attention under a mask
              built from explicit spans, on random packed layouts: outputs and q/k/v
              gradients in bf16 within bf16 tolerances.
  deepspeed   `deepspeed --num_gpus 1 megafusion/train.py` on configs/tiny.yaml with the large
              configs' settings (bf16, parallel.zero_init, activation checkpointing; NCCL on
              the GPU): 10 steps uninterrupted, and a resume from its step-5 checkpoint (copied
              to a new run directory, as a preempted run leaves it) to 10, on metrics.jsonl.
  throughput  the fused train step of a Llama-3.2-1B-sized random model on 4096 tokens (half
              image) against the dense HF LlamaForCausalLM step: tokens/s and MFU of each, the
              frozen text tower counted at 4N (megafusion/flops.py states the formula); and
              X-Fusion's Dual Tower step (model.tower_mode=dual_tower) beside the lmfusion one.
  kernels     the optional fused kernels against the defaults (tools/gpu_kernels.py): apex's
              FusedRMSNorm against the Llama norm, DeepSpeed's and apex's FusedAdam against
              torch's fused AdamW; times and differences, "not installed" where absent.
  qwz         the 70B config's ZeRO++ int8 weight gathers (zero_quantized_weights) against
              exact gathers, 6 steps each with the deepspeed check's settings: the losses
              within 2%, and DeepSpeed's log says the quantizer kernel was loaded.

--cpu: bf16 attention with SDPA standing in for flash-attn and flex skipped (no CPU
backward), the deepspeed runs with DS_ACCELERATOR=cpu (gloo), a 2-layer model for
throughput (no MFU: no CPU peak), qwz's exact side alone (no kernel). The GPU target lacks deepspeed, diffusers and
mosaicml-streaming and has no network: --build-wheels DIR (on a machine with PyPI) writes
them as wheels with the tiny Llama and megafusion's source, and --wheels DIR installs
what is missing offline (tools/wheelhouse.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tools import wheelhouse  # noqa: E402
from tools.gpu_kernels import check_kernels  # noqa: E402

CHECKS = ("attention", "deepspeed", "throughput", "kernels", "qwz")
H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s (H100/H200 SXM datasheet; ~790e12 measured on matmuls)

# bf16 keeps 8 significant bits: unit roundoff u = 2^-9. Kernels accumulate in fp32 but
# round P (softmax) and the outputs to bf16, so errors are a few u.
U = 2.0 ** -9
TOLERANCE = {"out": {"rel_l2": 8 * U, "max_rel": 32 * U}, "grad": {"rel_l2": 16 * U, "max_rel": 32 * U}}

SIZES = {  # per mode: attention layouts, the throughput model, the deepspeed runs
    "cuda": dict(att_batch=2, att_len=1024, att_heads=(16, 4), att_dim=64, att_layouts=3,
                 model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                            max_position_embeddings=131072),  # RoPE settings left default: timing ignores them
                 image_size=32, tokens=4096, docs=4, warmup=3, timed=10, dtype=torch.bfloat16, run_timeout=240),
    "cpu": dict(att_batch=2, att_len=320, att_heads=(4, 2), att_dim=16, att_layouts=3,
                model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
                image_size=8, tokens=128, docs=2, warmup=1, timed=3, dtype=torch.float32, run_timeout=900),
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_check(name: str, fn, *args) -> dict:
    """fn(*args) -> dict with "ok"; an exception becomes ok False with its text."""
    log(f"{name}: start")
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
            result = fn(*args)
    except (Exception, SystemExit) as e:  # library code may exit; the other checks go on
        result = {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.time() - t0, 1)
    log(f"{name}: {'passed' if result.get('ok') else 'FAILED'} in {result['seconds']} s"
        + (f" ({result['error'].splitlines()[0][:200]})" if "error" in result else ""))
    return result


# ---------------------------------------------------------------------- 1. attention

def random_layout(B: int, L: int, g: torch.Generator):
    """document_ids / image_ids [B, L] as PackedBatch lays them out, and the mask from
    explicit spans: a query sees its document's keys up to itself, plus its whole image."""
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    document_ids = torch.zeros(B, L, dtype=torch.long)
    image_ids = torch.full((B, L), -1, dtype=torch.long)
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    n_images = 0
    for b in range(B):
        pos, doc = 0, 0
        while pos < L:
            start, end = pos, min(L, pos + rand(L // 6, L // 2))
            while pos < end:
                n = rand(2, max(2, min(L // 6, end - pos))) if end - pos >= 2 else 1
                if n >= 2 and rand(0, 2) == 0:  # an image; two may touch
                    image_ids[b, pos:pos + n] = n_images
                    mask[b, pos:pos + n, pos:pos + n] = True
                    n_images += 1
                pos += n
            document_ids[b, start:end] = doc
            for i in range(start, end):
                mask[b, i, start:i + 1] = True
            doc += 1
    return document_ids, image_ids, mask


def naive_attention(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ v


def forward_backward(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    return [t.detach().double() for t in (out, *grads)]


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = (got - want).abs()
    return {"rel_l2": (diff.norm() / want.norm()).item(), "max_rel": (diff.max() / want.abs().max()).item()}


def check_attention(device, s) -> dict:
    from megafusion.model.attention import AttentionLayout, hybrid_attention, sdpa_varlen_primitive

    cuda = device.type == "cuda"
    real_flash = cuda and importlib.util.find_spec("flash_attn") is not None
    backends = {"sdpa": {}, "flash": {"primitive": "flash_attn" if real_flash else "SDPA standing in for flash-attn"},
                "flex": {} if cuda else {"skipped": "flex_attention has no backward on the CPU"}}
    active = [name for name, info in backends.items() if "skipped" not in info]
    (hq, hkv), d, B, L = s["att_heads"], s["att_dim"], s["att_batch"], s["att_len"]
    g = torch.Generator().manual_seed(0)
    layouts = []
    for _ in range(s["att_layouts"]):
        document_ids, image_ids, mask = random_layout(B, L, g)
        q, k, v, up = (torch.randn(B, h, L, d, generator=g).to(device, torch.bfloat16) for h in (hq, hkv, hkv, hq))
        mask = mask.to(device)
        q64, k64, v64 = q.double(), k.double(), v.double()
        ref = forward_backward(lambda q, k, v: naive_attention(q, k, v, mask), q64, k64, v64, up)
        # Sensitivity: plain causal attention (images not bidirectional) must fail the
        # output tolerance at least 4x over, or the check could not see a mask error.
        control = errors(naive_attention(q64, k64, v64, mask & mask.new_ones(L, L).tril()), ref[0])
        entry = {"documents": int(sum(len(r.unique()) for r in document_ids)), "images": int(image_ids.max()) + 1,
                 "image_tokens": int((image_ids >= 0).sum()), "causal_control": control,
                 "causal_control_fails_by": max(control[m] / TOLERANCE["out"][m] for m in control)}
        for name in active:
            primitive = sdpa_varlen_primitive if name == "flash" and not real_flash else None
            layout = AttentionLayout.build(document_ids.to(device), image_ids.to(device), name, primitive=primitive)
            got = forward_backward(lambda q, k, v: hybrid_attention(q, k, v, layout), q, k, v, up)
            entry[name] = {t: errors(a, b) for t, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
        layouts.append(entry)
    ok = all(e["causal_control_fails_by"] >= 4 for e in layouts)
    for name in active:
        worst = {t: {m: max(e[name][t][m] for e in layouts) for m in ("rel_l2", "max_rel")} for t in ("out", "dq", "dk", "dv")}
        backends[name].update(worst=worst, ok=all(worst[t][m] <= TOLERANCE["out" if t == "out" else "grad"][m]
                                                  for t in worst for m in worst[t]))
        ok &= backends[name]["ok"]
    return {"ok": ok, "dtype": "bfloat16", "reference": "float64 attention under a mask built from explicit spans",
            "shape": {"batch": B, "seq_len": L, "q_heads": hq, "kv_heads": hkv, "head_dim": d},
            "tolerance": TOLERANCE, "tolerance_note": "u = 2^-9 (bf16 unit roundoff); rel_l2 = |got-ref|/|ref|, "
            "max_rel = max|got-ref| / max|ref|, per tensor", "backends": backends, "layouts": layouts}


# ---------------------------------------------------------------------- 2. deepspeed

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(cmd: list[str], env: dict, log_file: Path, timeout: int) -> str:
    with open(log_file, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
    out = log_file.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"exit status {p.returncode} of {' '.join(cmd[:6])} ...; output ends:\n{out[-3000:]}")
    return out


# The large configs' settings. Both deepspeed runs are 10 steps, so any schedule would
# match; a constant lr after warmup keeps the comparison valid if either length changes.
LARGE_SETTINGS = ["train.dtype=bf16", "parallel.zero_init=true", "model.activation_checkpointing=true",
                  "train.schedule=constant", "checkpoint.every=5", "checkpoint.keep_last=0", "log.tensorboard=false"]


@dataclasses.dataclass
class TinyRuns:
    """`deepspeed --num_gpus 1 megafusion/train.py` on configs/tiny.yaml, on the tiny Llama
    and synthetic shards, in `tmp`; shared by the deepspeed and qwz checks."""

    device: torch.device
    s: dict
    tmp: Path
    wheels: Path | None

    def __post_init__(self):
        cuda = self.device.type == "cuda"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cuda" if cuda else "cpu")
        if cuda:
            self.env["NCCL_DEBUG"] = "VERSION"  # NCCL prints its version when a communicator starts
        w = self.wheels
        self.base = w / "tiny-llama" if w is not None and (w / "tiny-llama").is_dir() else self.tmp / "tiny-llama"
        self.shards = self.tmp / "shards"

    def prepare(self) -> None:
        if not (self.base / "config.json").is_file():
            from tools.make_tiny_llama import make_tiny_llama

            make_tiny_llama(self.base, seed=0)
        if not (self.shards / "index.json").is_file():
            launch([sys.executable, str(REPO / "tools" / "prepare_data.py"), "synthetic", "--out", str(self.shards),
                    "--n", "200", "--seed", "0"], self.env, self.tmp / "prepare_data.log", self.s["run_timeout"])

    def train(self, run: str, steps: int, *extra: str, timeout: int | None = None) -> str:
        self.prepare()
        port = free_port()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
               str(REPO / "megafusion" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
               f"model.base={self.base}", f"data.train={self.shards}", f"data.cache_root={self.tmp / 'cache'}",
               f"data.run_id={run}-{os.getpid()}", f"run.dir={self.tmp / run}", f"train.steps={steps}",
               *LARGE_SETTINGS, *extra]
        log(f"deepspeed: {run}, {steps} steps")
        try:
            return launch(cmd, self.env, self.tmp / f"{run}-{steps}.log", timeout or self.s["run_timeout"])
        finally:  # the CPU shm op leaves its buffers in /dev/shm, named by port
            for f in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
                f.unlink(missing_ok=True)

    def losses(self, run: str) -> dict:
        rows = [json.loads(line) for line in (self.tmp / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows}  # a resumed run appends: the last record per step


def check_deepspeed(runs: TinyRuns) -> dict:
    cuda, tmp, env = runs.device.type == "cuda", runs.tmp, runs.env
    train, losses, settings, base = runs.train, runs.losses, LARGE_SETTINGS, runs.base

    out_a = train("uninterrupted", 10)
    # The resume starts from the uninterrupted run's own step-5 checkpoint, copied to a new
    # run directory as a run stopped after step 5 leaves it: one launch fewer (~30 s of a
    # dry run, and GPU time) than training a second run to 5 first.
    ckpts = tmp / "resumed" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(tmp / "uninterrupted" / "checkpoints" / "global_step5", ckpts / "global_step5")
    (ckpts / "latest").write_text("global_step5")
    out_b = train("resumed", 10)
    a, b = losses("uninterrupted"), losses("resumed")
    keys = ("loss", "lm_loss", "diffusion_loss")
    rtol = 1e-2 if cuda else 0.0  # CUDA's atomics (index_add in backward) make runs differ in the last bits
    diff = max(abs(a[i][k] - b[i][k]) / max(1e-12, abs(a[i][k])) for i in b for k in keys)
    result = {
        "settings": settings, "accelerator": env["DS_ACCELERATOR"], "base": str(base),
        "losses_uninterrupted": [a[i]["loss"] for i in sorted(a)], "losses_resumed": [b[i]["loss"] for i in sorted(b)],
        "max_rel_diff": diff, "rtol": rtol, "bitwise": diff == 0.0,
        "resumed_at_step_5": "resumed from" in out_b and "at step 5" in out_b,
        "checkpoints": sorted(p.name for p in (tmp / "resumed" / "checkpoints").glob("global_step*")),
    }
    if cuda:
        result["nccl_started"] = "NCCL version" in out_a
    # The start-up fit check (megafusion/plan/fit_check.py) reads the device's memory on
    # CUDA: the tiny model fits any GPU, so a warning here is a wrong reading.
    result["fit_warning"] = "warning: tools/plan.py estimates" in out_a
    trained = a[10]["diffusion_loss"] < a[1]["diffusion_loss"] and not any(r["skipped"] for r in a.values())
    finite = all(math.isfinite(a[i][k]) for i in a for k in keys)
    result["ok"] = (sorted(a) == list(range(1, 11)) and sorted(b) == list(range(6, 11)) and diff <= rtol
                    and result["resumed_at_step_5"] and trained and finite and not result["fit_warning"])
    return result


def check_qwz(runs: TinyRuns) -> dict:
    """ZeRO++ qwZ, ds_configs/zero3_llama3_70b.json's int8 weight gathers, against exact
    gathers on the same tiny run: DeepSpeed's CUDA quantizer kernel (JIT-built by the
    first run that uses it) in the forward, recompute and backward passes. The
    persistence threshold is 0 so that every tiny weight is gathered, as every 70B
    matrix is. On the CPU the kernel does not exist (the trainer refuses qwZ; the suite
    runs DeepSpeed's quantizer code with a stand-in kernel, tests/parallel/test_qwz.py):
    the dry run trains the exact side alone."""
    cuda = runs.device.type == "cuda"
    steps = 6

    def ds_json(qwz: bool) -> Path:
        ds = json.loads((REPO / "ds_configs" / "zero3_llama3_70b.json").read_text())
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, zero_quantized_weights=qwz)
        path = runs.tmp / ("qwz.json" if qwz else "exact.json")
        path.write_text(json.dumps(ds))
        return path

    runs.train("exact", steps, f"parallel.ds_config={ds_json(False)}", "checkpoint.every=0")
    exact = [runs.losses("exact")[i]["loss"] for i in range(1, steps + 1)]
    result = {"steps": steps, "losses_exact": exact}
    if not cuda:
        return dict(result, skipped="the quantizer kernel needs CUDA", ok=len(exact) == steps)
    t0 = time.time()
    out = runs.train("qwz", steps, f"parallel.ds_config={ds_json(True)}", "checkpoint.every=0", timeout=600)
    got = [runs.losses("qwz")[i]["loss"] for i in range(1, steps + 1)]
    diff = max(abs(g - e) / abs(e) for g, e in zip(got, exact))
    # DeepSpeed's op builder prints this when CUDAQuantizer loads its kernel (built or
    # cached): the evidence that qwZ was on. Unequal losses would not be: two exact CUDA
    # runs already differ in the last bits (index_add's atomics).
    loaded = "Time to load quantizer op" in out
    # int8 per group of up to 8k weights moves each weight by at most 1/254 of its
    # group's largest; on CPU ranks with a stand-in kernel the losses moved 0.03%.
    return dict(result, losses_qwz=got, max_rel_diff=diff, rtol=0.02, quantizer_loaded=loaded,
                seconds_with_kernel_build=round(time.time() - t0, 1), ok=diff <= 0.02 and loaded)


# --------------------------------------------------------------------- 3. throughput

def check_throughput(device, s, peak: float | None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from megafusion.model.attention import select_backend
    from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment
    from megafusion.model.config import FusionConfig
    from megafusion.flops import FORMULA, attention_pairs, causal_pairs, linear_patcher_flops, train_step_flops
    from megafusion.model.fusion import LMFusionModel

    cuda, dtype = device.type == "cuda", s["dtype"]
    config = LlamaConfig(**s["model"], attn_implementation="sdpa", use_cache=False)
    fcfg = FusionConfig(image_mode="pixel", image_size=s["image_size"], patch_size=2, patcher="linear",
                        attention_backend="auto")
    per_image, T, g = (s["image_size"] // 2) ** 2, s["tokens"], torch.Generator().manual_seed(0)
    pairs_per_doc = T // s["docs"] // (2 * per_image)  # each document: (text run, image) pairs, half image tokens
    docs = [[seg for _ in range(pairs_per_doc) for seg in (
        TextSegment(torch.randint(0, config.vocab_size, (per_image,), generator=g).tolist()),
        ImageSegment(torch.rand(3, s["image_size"], s["image_size"], generator=g) * 2 - 1, timestep=500.0))]
        for _ in range(s["docs"])]
    batch = PackedBatch.from_rows([docs], seq_len=T, tokens_per_image=per_image, images_are_latents=False)
    noise = torch.randn(batch.images.shape, generator=g).to(device)
    ids = torch.randint(0, config.vocab_size, (1, T), generator=g).to(device)

    def measure(model, loss_fn) -> dict:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6,
                                **({"fused": True} if cuda else {"foreach": True}))
        last = []

        def step():
            loss = loss_fn(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last[:] = [loss.detach()]

        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(s["warmup"] + s["timed"]):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        times = times[s["warmup"]:]
        med = statistics.median(times)
        out = {"step_ms_median": round(1e3 * med, 2), "step_ms": [round(1e3 * t, 2) for t in times],
               "tokens_per_s": round(T / med, 1), "loss": float(last[0])}
        if cuda:
            out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        return out

    n_image = int((batch.modality == 1).sum())
    backend = select_backend(fcfg.attention_backend, device, dtype=dtype)
    batch_dev = batch.to(device)

    def fused_step(mode: str) -> tuple[dict, int, int]:
        """The fused step of one decoder-layer design (model.tower_mode)."""
        torch.manual_seed(0)
        with torch.device(device):
            fused = LMFusionModel(LlamaForCausalLM(config).to(dtype), dataclasses.replace(fcfg, tower_mode=mode))
            fused = fused.to(device, dtype).train()
        n_targets = int((fused.lm_targets(batch) != -100).sum())
        log(f"throughput: fused step ({mode}), {T} tokens ({n_image} image), attention {backend}")
        result = measure(fused, lambda m: m(batch_dev, noise=noise).loss)
        result["flops"] = train_step_flops(
            config, text_tokens=T - n_image, image_tokens=n_image, logit_tokens=n_targets, frozen_text=True,
            attention_pairs=attention_pairs(batch.document_ids, batch.image_ids), tower_mode=mode,
            image_io=linear_patcher_flops(3 * 2 * 2, config.hidden_size, n_image))
        counts = [sum(p.numel() for p in fused.parameters() if p.requires_grad is t) for t in (False, True)]
        del fused
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        return result, n_targets, counts

    fused_result, n_targets, (frozen, trainable) = fused_step("lmfusion")
    # X-Fusion's Dual Tower: what its second stream costs on this device (tools/bench.py's
    # dual_tower_vs_lmfusion measures the same on the CPU).
    dual_result, _, _ = fused_step("dual_tower")

    log("throughput: dense HF step")
    torch.manual_seed(1)
    with torch.device(device):
        dense = LlamaForCausalLM(config).to(dtype).train()
    dense_result = measure(dense, lambda m: m(input_ids=ids, labels=ids).loss)
    dense_result["flops"] = train_step_flops(config, text_tokens=T, logit_tokens=T, attention_pairs=causal_pairs(1, T))
    dense_params = sum(p.numel() for p in dense.parameters())
    del dense
    gc.collect()

    for r in (fused_result, dual_result, dense_result):
        med = r["step_ms_median"] / 1e3
        r["achieved_flops_per_s"] = float(f"{r['flops']['total'] / med:.4g}")
        r["mfu"] = round(r["flops"]["total"] / med / peak, 4) if peak else None
    results = (fused_result, dual_result, dense_result)
    ok = all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in results)
    if peak:  # above 100% the FLOP count would be wrong
        ok &= all(0 < r["mfu"] < 1 for r in results)
    return {"ok": ok, "dtype": str(dtype).removeprefix("torch."), "tokens": T, "image_tokens": n_image,
            "text_targets": n_targets, "attention_backend": backend, "peak_flops": peak, "formula": FORMULA,
            "model": s["model"],
            "parameters": {"fused_frozen": frozen, "fused_trainable": trainable, "dense": dense_params},
            "what": "one packed row; forward + backward + AdamW step; fused: frozen text tower, linear patcher, "
                    "pixel images; dense: every weight trainable, labels on every token",
            "fused": fused_result, "dense": dense_result, "dual_tower": dual_result,
            "fused_over_dense_step_time": round(fused_result["step_ms_median"] / dense_result["step_ms_median"], 4),
            "dual_tower_over_fused_step_time": round(dual_result["step_ms_median"] / fused_result["step_ms_median"], 4)}


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="dry run of the same code paths on the CPU, tiny sizes")
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--wheels", help="wheelhouse (from --build-wheels) to install missing packages from, offline")
    p.add_argument("--build-wheels", metavar="DIR", help="write the wheelhouse for the GPU machine and exit")
    p.add_argument("--only", default=",".join(CHECKS), help="comma-separated checks to run")
    p.add_argument("--peak-flops", type=float, default=None, help=f"peak FLOP/s for MFU (CUDA default {H200_PEAK_BF16:.3g})")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (runs, logs)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(CHECKS)
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}")
    if args.build_wheels:
        out = wheelhouse.build(Path(args.build_wheels).resolve())
        print(f"on the GPU machine: python {out / 'megafusion-src/tools/gpu_check.py'} --wheels {out} --out gpu_check.json")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; tools/gpu_check.py --cpu runs the dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:  # the dry run is about code paths; one thread is fastest on a shared, busy CPU
        torch.set_num_threads(1)
    s = SIZES[device.type]
    wheels = Path(args.wheels).resolve() if args.wheels else None
    t0 = time.time()
    packages = wheelhouse.install(wheels)
    from megafusion.parallel.launch import use_private_extensions_dir

    use_private_extensions_dir()  # the kernels check's JIT builds go where the runs' ranks look for them
    versions = {}
    for dist in ("torch", "transformers", "deepspeed", "diffusers", "mosaicml-streaming", "triton", "flash-attn"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    env = {"python": sys.version.split()[0], "versions": versions, "packages": packages,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda}
    tmp = Path(tempfile.mkdtemp(prefix="megafusion-gpu-check-"))
    peak = args.peak_flops if args.peak_flops is not None else (H200_PEAK_BF16 if device.type == "cuda" else None)
    runs = TinyRuns(device, s, tmp, wheels)
    checks = {"attention": lambda: check_attention(device, s),
              "deepspeed": lambda: check_deepspeed(runs),
              "throughput": lambda: check_throughput(device, s, peak),
              "kernels": lambda: check_kernels(device, s),
              "qwz": lambda: check_qwz(runs)}
    results = {}
    for name, fn in checks.items():
        if name in args.only.split(","):
            results[name] = run_check(name, fn)
            if args.out:  # what has run survives a run killed at its time limit
                partial = {"ok": False, "partial": True, "environment": env, "checks": results}
                Path(args.out).write_text(json.dumps(partial, indent=1) + "\n")
    report = {"ok": all(r["ok"] for r in results.values()), "mode": device.type, "environment": env,
              "seconds": round(time.time() - t0, 1), "checks": results}
    if args.keep:
        report["tmp"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    log(f"{'all checks passed' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
