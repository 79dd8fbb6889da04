"""Samples during training: every log.sample_every steps, a grid of images for the fixed
prompts (log.sample_prompts, log.sample_per_prompt each, one row per prompt) and
captions of the first log.sample_captions held-out images (data.val), written to
tensorboard (samples/grid, samples/captions) and to <run.dir>/samples/step_NNNNNNN.{png,txt}.

Under ZeRO-3 every rank runs the same sampling code on the same inputs, so the
collectives match (identical inputs and weights also make every rank's greedy decoding
stop at the same token). Two ways to have the weights, chosen by log.sample_gather:
- whole: gather every parameter once, remove DeepSpeed's module hooks, sample, put the
  hooks back (deepspeed.runtime.zero.stage3.unwrap_model_for_generation, but gathering one
  parameter at a time, see parallel/gather.py). Each rank holds the whole model while it
  samples. The demo: 195 s per sample point per-module, far less whole.
- module: DeepSpeed's forward hooks gather each submodule's parameters as it is called,
  as in training; the root module's own parameters (the BOI/EOI rows) are gathered here.
  No rank ever holds the whole model (8B, 70B), at the price of one all-gather per module
  call, i.e. per layer and denoising step.
- auto (default): whole when the model's parameters take at most 4 GiB, else module.

When the run's data is the synthetic shapes task (its shards carry the generator's `meta`),
each sample point also scores what it drew and said with the shapes analyser
(megafusion/eval): grid images whose prompt is in the task's grammar against that prompt,
captions against the held-out images' meta; accuracies go to tensorboard as
shapes/{generation,captioning}/<attribute>. A handful of samples, so a cheap trend line;
tools/evaluate.py shapes gives the number. With log.sample_eval_n > 0 the sample point
also runs that evaluation itself on the first sample_eval_n held-out rows (the same
code, megafusion/eval/run_shapes.py) and appends the result to
<run.dir>/shapes_eval.jsonl (tensorboard shapes_eval/*): the learning curve that
tools/learning_curve.py draws.

The global RNG is left untouched (sampling draws from its own seeded generators), so a
run with samples is bitwise the same run as one without.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megafusion.config import RunConfig
from megafusion.parallel.gather import gathered


def held_out_images(cfg: RunConfig, n: int, with_meta: bool = False) -> list:
    """The first n images of data.val's first stream as (key, PIL RGB, caption), read
    identically on every rank (streaming's LocalDataset: no shared memory, no
    partitioning); with_meta appends the row's meta (None without one). [] when there is
    no local val directory."""
    from megafusion.data.images import load_rgb

    streams = cfg.data.val_streams()
    if n <= 0 or not streams or "://" in streams[0].remote or not Path(streams[0].remote, "index.json").is_file():
        return []
    from streaming import LocalDataset

    with tempfile.TemporaryDirectory(prefix="megafusion-held-out-") as tmp:
        _first_shards(Path(streams[0].remote), Path(tmp), n)
        ds = LocalDataset(local=tmp)
        out = []
        for i in range(min(n, len(ds))):
            row = ds[i]
            if "image" in row:
                item = (str(row.get("id", i)), load_rgb(row["image"], cfg.model.image_size), row.get("caption", ""))
                out.append(item + (row.get("meta"),) if with_meta else item)
    return out


def is_synthetic(cfg: RunConfig) -> bool:
    """Whether the run's data is the synthetic shapes task: the first local stream of
    data.val (else data.train) has the `meta` column tools/prepare_data.py synthetic writes."""
    for streams in (cfg.data.val_streams(), cfg.data.train_streams()):
        for spec in streams:
            if "://" in spec.remote:
                continue
            try:
                index = json.loads(Path(spec.remote, "index.json").read_text())
            except (OSError, ValueError):
                continue
            return any("meta" in (shard.get("column_names") or ()) for shard in index.get("shards", [])[:1])
    return False


def _first_shards(src: Path, dst: Path, n: int) -> None:
    """Copy (decompressing) the first shards of an MDS directory holding >= n samples into
    dst with their own index.json: LocalDataset reads raw shards only, and the shards
    prepare_data writes are zstd-compressed (StreamingDataset decompresses into its cache,
    which would need the distributed machinery and shared memory)."""
    from streaming.base.compression import decompress

    index = json.loads((src / "index.json").read_text())
    kept, total = [], 0
    for shard in index["shards"]:
        raw = shard["raw_data"]["basename"]
        if (src / raw).is_file():
            shutil.copyfile(src / raw, dst / raw)
        else:
            zipped = shard.get("zip_data") or {}
            (dst / raw).write_bytes(decompress(shard["compression"], (src / zipped["basename"]).read_bytes()))
        kept.append({**shard, "zip_data": None, "compression": None})
        total += int(shard["samples"])
        if total >= n:
            break
    (dst / "index.json").write_text(json.dumps({**index, "shards": kept}))


WHOLE_MODEL_MAX_BYTES = 4 << 30


def parameter_bytes(model) -> int:
    """Bytes of all parameters when whole (ZeRO-3 partitions report ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def gather_mode(setting: str, model) -> str:
    if setting not in ("auto", "whole", "module"):
        raise ValueError(f"log.sample_gather={setting!r}: expected auto, whole or module")
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return "none"  # not partitioned (ZeRO 0-2, pipeline): nothing to gather
    if setting == "auto":
        return "whole" if parameter_bytes(model) <= WHOLE_MODEL_MAX_BYTES else "module"
    return setting


@contextlib.contextmanager
def weights_for_sampling(engine, mode: str):
    """The module with usable weights for the duration (see the module docstring)."""
    model = engine.module
    if mode == "none":
        yield model
    elif mode == "module":
        with gathered([p for p in model.parameters(recurse=False)]):
            yield model
    else:
        offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
        with gathered(model.parameters()):
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield model
            finally:
                offload._register_deepspeed_module(offload.module)


class TrainingSampler:
    def __init__(self, cfg: RunConfig, engine, tokenizer, run_dir: Path, rank: int):
        model = engine.module
        self.engine = engine
        self.mode = gather_mode(cfg.log.sample_gather, model)
        from megafusion.export import special_ids
        from megafusion.generate import Generator, vlm_processor

        self.cfg, self.model, self.rank = cfg, model, rank
        self.dir = run_dir / "samples"
        bos, eos = special_ids(tokenizer, cfg.data)
        self.gen = Generator(model, tokenizer, bos, eos, model.boi_id, model.eoi_id,
                             steps=cfg.log.sample_diffusion_steps, guidance_scale=cfg.log.sample_guidance,
                             processor=vlm_processor(model, cfg.model.base))  # LLaVA bases caption through the VLM
        held = held_out_images(cfg, cfg.log.sample_captions, with_meta=True)
        self.images = [h[:3] for h in held]
        self.metas = [h[3] for h in held]
        self.synthetic = is_synthetic(cfg)
        self.run_dir = run_dir
        self.eval_rows = self._eval_rows(cfg) if self.synthetic and cfg.log.sample_eval_n > 0 else []

    @staticmethod
    def _eval_rows(cfg: RunConfig) -> list[dict]:
        from megafusion.eval.rows import read_shards

        streams = cfg.data.val_streams()
        if not streams or "://" in streams[0].remote:
            return []
        return read_shards(streams[0].remote, cfg.log.sample_eval_n, option="data.val")

    @torch.no_grad()
    def __call__(self, step: int, writer=None) -> Path | None:
        from megafusion import generate as G

        log = self.cfg.log
        # With the whole model on every rank (or no partitioning) sampling needs no
        # collectives, so rank 0 samples alone; on the CPU it borrows the waiting local
        # ranks' threads. Per-module gathering needs every rank in step.
        alone = self.mode in ("whole", "none")
        if alone and self.rank != 0:
            with weights_for_sampling(self.engine, self.mode):  # the gathers are collective
                pass
            return None
        was_training, threads = self.model.training, torch.get_num_threads()
        self.model.eval()
        if alone and self.model.image_token_embed.device.type == "cpu":
            local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            torch.set_num_threads(max(threads, min(threads * local, os.cpu_count() or 1)))
        try:
            with torch.random.fork_rng(devices=[]), weights_for_sampling(self.engine, self.mode):
                images = G.generate_image(self.gen, list(log.sample_prompts), n=log.sample_per_prompt,
                                          seed=self.cfg.run.seed, progress=False)
                captions = G.caption(self.gen, [im for _, im, _ in self.images], max_new_tokens=log.sample_caption_tokens) \
                    if self.images else []
                evaluation = None
                if self.eval_rows:
                    from megafusion.eval.run_shapes import evaluate_shapes

                    evaluation = evaluate_shapes(self.gen, self.eval_rows, seed=self.cfg.run.seed,
                                                 max_new_tokens=log.sample_caption_tokens, progress=False)
        finally:
            self.model.train(was_training)
            torch.set_num_threads(threads)
        if self.rank != 0:
            return None
        if evaluation is not None:
            self._write_evaluation(step, evaluation, writer)
        return self._write(step, images, captions, writer)

    def _write_evaluation(self, step: int, result: dict, writer) -> None:
        from megafusion.eval.run_shapes import shapes_scalars

        row = dict(step=step, n=result["n"], steps=result["steps"], cfg=result["cfg"],
                   generation=result["generation"], captioning=result["captioning"], seconds=result["seconds"])
        with open(self.run_dir / "shapes_eval.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for key, value in shapes_scalars(result, prefix="shapes_eval").items():
                writer.add_scalar(key, value, step)

    def _write(self, step, images, captions, writer) -> Path:
        import numpy as np

        from megafusion.generate import image_grid

        self.dir.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, cols=self.cfg.log.sample_per_prompt)
        png = self.dir / f"step_{step:07d}.png"
        grid.save(png)
        lines = [f"step {step}", "grid rows (top to bottom): " + " | ".join(self.cfg.log.sample_prompts)]
        lines += [f"{key}: true {true!r} -> model {got!r}" for (key, _, true), got in zip(self.images, captions)]
        scores = self.shapes_scores(images, captions)
        lines += [f"{k}: {v:.3f}" for k, v in scores.items()]
        png.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        if writer is not None:
            for key, value in scores.items():
                writer.add_scalar(key, value, step)
            writer.add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
            table = "| image | true caption | model caption |\n|---|---|---|\n" + "".join(
                f"| {key} | {true} | {got} |\n" for (key, _, true), got in zip(self.images, captions))
            writer.add_text("samples/prompts", " / ".join(self.cfg.log.sample_prompts), step)
            if captions:
                writer.add_text("samples/captions", table, step)
            writer.flush()
        return png

    def shapes_scores(self, images, captions) -> dict[str, float]:
        """Shapes accuracies of one sample point ({} unless the data is the synthetic task):
        the grid images whose prompt parses, the captions of held-out rows with meta."""
        if not self.synthetic:
            return {}
        from megafusion.eval.run_shapes import score_prompt, shapes_scalars
        from megafusion.eval.shapes import score_caption, summarise

        per = self.cfg.log.sample_per_prompt
        drawn = [score_prompt(im, self.cfg.log.sample_prompts[k // per]) for k, im in enumerate(images)]
        drawn = [s for s in drawn if s is not None]
        said = [score_caption(c, m) for c, m in zip(captions, self.metas) if isinstance(m, dict) and "kind" in m]
        return shapes_scalars(dict(generation=summarise(drawn) if drawn else None,
                                   captioning=summarise(said) if said else None))
