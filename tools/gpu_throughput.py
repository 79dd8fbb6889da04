"""tools/gpu_check.py's `throughput` check: the fused train step of a Llama-3.2-1B-sized
random model against the dense HF LlamaForCausalLM step (tokens/s and MFU of each, the
frozen text tower counted at 4N), and X-Fusion's Dual Tower step beside the lmfusion one."""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time

import torch

from tools.gpu_harness import log


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

