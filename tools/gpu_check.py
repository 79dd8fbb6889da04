#!/usr/bin/env python
"""The GPU path checked on one GPU, or its dry run on the CPU.

    python tools/gpu_check.py [--wheels DIR] [--out FILE]   on a machine with a CUDA GPU
    python tools/gpu_check.py --cpu [--out FILE]            the same code paths, tiny, on the CPU
    python tools/gpu_check.py --build-wheels DIR            wheelhouse for an offline GPU machine

Five independent checks: one that raises is recorded with its exception and the others
still run. One JSON object on stdout (and --out, rewritten after each check so that a run
killed at its time limit keeps what finished), progress on stderr, exit status 0 when
every check passed. About 8 minutes on one H200 for the first four; qwz, last, adds two
short runs and the JIT build of DeepSpeed's quantizer kernel. Each check lives in its
own file (tools/gpu_attention.py, gpu_runs.py for deepspeed and qwz, gpu_throughput.py,
gpu_kernels.py); this one runs them and writes the report.

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
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tools import wheelhouse  # noqa: E402
from tools.gpu_attention import check_attention  # noqa: E402
from tools.gpu_harness import log, run_check  # noqa: E402
from tools.gpu_kernels import check_kernels  # noqa: E402
from tools.gpu_runs import TinyRuns, check_deepspeed, check_qwz  # noqa: E402
from tools.gpu_throughput import check_throughput  # noqa: E402

CHECKS = ("attention", "deepspeed", "throughput", "kernels", "qwz")
H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s (H100/H200 SXM datasheet; ~790e12 measured on matmuls)

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
