"""The bench entry sampling_cached_vs_uncached, registered in tools/bench.py.

    sampling_cached_vs_uncached   one 50-step text-to-image sample with the prompt's KV
                                  cache / without it (every denoising step re-runs the
                                  prompt); also the per-step ratio

It times megafusion.model.tasks.text_to_image, what tools/generate.py image runs, with the
cached and the uncached denoisers of tasks.py. The model has the bench's base config
(SmolLM2-135M's dimensions at full depth; 2 layers with --quick) with random weights.
tools/bench.py calls register(itself) after its helpers are defined.
"""
from __future__ import annotations

import statistics
import time

import torch

from megafusion.model import inference as inf
from megafusion.model import tasks

_bench = None  # tools/bench.py's module, set by register()


def register(bench) -> None:
    global _bench
    _bench = bench
    bench.benchmark("sampling_cached_vs_uncached")(sampling_cached_vs_uncached)


def sampling_cached_vs_uncached(ctx) -> dict:
    """Demo image dimensions, a 64-token prompt, 64 image tokens, CFG batched. Quick mode:
    5 steps, 1 repeat."""
    lc = _bench.llama_config(ctx)
    if ctx.quick:
        return measure(lc, steps=5, repeats=1, step_repeats=2)
    return measure(lc, repeats=max(1, min(ctx.repeats, 3)))


def measure(lc, steps: int = 50, repeats: int = 3, prompt_tokens: int = 64, guidance_scale: float = 3.0,
            step_repeats: int = 5, threads: int | None = 1, seed: int = 0) -> dict:
    """Time of one text-to-image sample (the base config lc with random weights, pixel
    mode 32x32, 4x4 patches = 64 image tokens; a `prompt_tokens` prompt; classifier-free
    guidance, so conditional and unconditional rows) with the prompt's KV cache and
    without it (every step re-runs the prompt), interleaved repeats, medians of CPU time
    (process_time) and wall clock. Also the per-step cost
    ratio (one denoising step, cache prefilled). value = cached / uncached CPU time;
    goal <= 0.7. Measured 2026-11 (defaults, 1 thread, loaded machine): 0.55, per step
    0.53; about 4 minutes at the defaults (each uncached sample is ~38 s of CPU)."""
    from transformers import LlamaForCausalLM

    from megafusion.model.config import FusionConfig
    from megafusion.model.fusion import LMFusionModel

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = LlamaForCausalLM(lc)
            cfg = FusionConfig(base="random", image_mode="pixel", image_size=32, patch_size=4, patcher="linear",
                               attention_backend="sdpa")
            model = LMFusionModel(base, cfg).eval()
            for p in model.image_tokenizer.predictor.parameters():  # non-zero predictions
                torch.nn.init.normal_(p, std=0.02)
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(10, lc.vocab_size, (prompt_tokens - 2,), generator=g).tolist()
        bos, boi = 1, model.boi_id

        def sample(use_cache, n_steps=steps):
            return lambda: tasks.text_to_image(model, [prompt], bos=bos, boi=boi, steps=n_steps,
                                             guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0),
                                             use_cache=use_cache)

        rows = [[bos] + prompt + [boi], [bos, boi]] if guidance_scale != 1.0 else [[bos] + prompt + [boi]]
        x = torch.randn(len(rows), 3, 32, 32, generator=g)
        t = torch.full((len(rows),), 500.0)
        cache, _ = inf.prefill(model, rows)
        cached_step, uncached_step = tasks.cached_denoiser(model, cache), tasks.uncached_denoiser(model, rows)

        def step(fn):
            return lambda: [fn(x, t) for _ in range(step_repeats)]

        def timed(variants: dict, n: int, warmup: dict) -> tuple[dict, list[float]]:
            out = {k: ([], []) for k in variants}
            for fn in warmup.values():
                fn()
            for r in range(n):
                order = list(variants) if r % 2 == 0 else list(variants)[::-1]
                for k in order:
                    w0, c0 = time.perf_counter(), time.process_time()
                    variants[k]()
                    c1, w1 = time.process_time(), time.perf_counter()
                    out[k][0].append(c1 - c0)
                    out[k][1].append(w1 - w0)
            rounds = [c / u for c, u in zip(out["cached"][0], out["uncached"][0])]
            return {k: (statistics.median(c), statistics.median(w)) for k, (c, w) in out.items()}, rounds

        with torch.no_grad():
            variants = {"cached": step(cached_step), "uncached": step(uncached_step)}
            steps_t, _ = timed(variants, repeats, warmup=variants)
            # Warm (the per-step rounds ran the same code): a 2-step sample of each suffices.
            full_t, rounds = timed({"cached": sample(True), "uncached": sample(False)}, repeats,
                           warmup={"cached": sample(True, 2), "uncached": sample(False, 2)})
        ratio = full_t["cached"][0] / full_t["uncached"][0]
        return {
            "value": ratio,
            "unit": "ratio",
            "goal": 0.7,
            "met": ratio <= 0.7,
            "median_ms": {k: 1000 * v[0] for k, v in full_t.items()},
            "spread": [min(rounds), max(rounds)],
            "median_wall_ms": {k: 1000 * v[1] for k, v in full_t.items()},
            "wall_ratio": full_t["cached"][1] / full_t["uncached"][1],
            "per_step_ratio": steps_t["cached"][0] / steps_t["uncached"][0],
            "per_step_ms": {k: 1000 * v[0] / step_repeats for k, v in steps_t.items()},
            "per_step_wall_ratio": steps_t["cached"][1] / steps_t["uncached"][1],
            "meta": {"steps": steps, "repeats": repeats, "prompt_tokens": prompt_tokens,
                     "image_tokens": model.tokens_per_image, "guidance_scale": guidance_scale,
                     "rows_per_step": len(rows), "threads": torch.get_num_threads(),
                     "layers": lc.num_hidden_layers, "hidden": lc.hidden_size},
        }
    finally:
        torch.set_num_threads(old_threads)
