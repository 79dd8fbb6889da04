"""What rank 0 records of each optimiser step: a line of <run.dir>/metrics.jsonl, the
progress bar, and every log.every steps tensorboard's losses, learning rate, gradient
norm, throughput and MFU. Every rank counts the model FLOPs of the batches it draws;
only rank 0 writes. A resume from step N first drops what an earlier attempt recorded
of the steps after N (metrics.jsonl rewritten, tensorboard's purge_step), so every step
is recorded once, by the attempt whose state the run continues."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def drop_steps_after(path: Path, step: int) -> None:
    """Keep only the lines of a run's records (metrics.jsonl, val_metrics.jsonl) up to
    `step`, the checkpoint a resume starts from: the steps after it are redone and logged again, and an earlier attempt's lines
    for them (a crash after the checkpoint) would appear twice. A line that does not
    parse (the torn last line of a killed writer) goes too. Rewritten beside and renamed
    over, so a crash here leaves the old file or the new one."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StepLog:
    def __init__(self, cfg, run_dir: Path, rank: int, world: int, data_parallel: int, model, start_step: int):
        """data_parallel: how many ranks draw different batches (world / pipeline stages):
        the ranks of one pipeline draw the same ones, which count once."""
        self.cfg, self.rank, self.world, self.data_parallel, self.model = cfg, rank, world, data_parallel, model
        self.writer = self.metrics = self.bar = None
        if rank == 0:
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # A resume redoes the steps after its checkpoint: purge_step hides the
                # events the earlier attempt wrote for them (step >= start_step + 1).
                self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                            purge_step=start_step + 1 if start_step > 0 else None)
            if start_step > 0:
                drop_steps_after(run_dir / "metrics.jsonl", start_step)
            self.metrics = open(run_dir / "metrics.jsonl", "a")
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stdout)
        # Wall clock of the training steps alone (not sampling, validation, checkpoints),
        # in metrics.jsonl: step_s per step, train_s summed since this attempt started.
        self.train_s = 0.0
        # Throughput since the last tensorboard point.
        self.t_last, self.tokens_since, self.samples_since, self.flops_drawn = time.time(), 0, 0, 0.0
        self._patcher_flops = None

    def step(self, step: int, *, loss, lm, diff, caption, align, gnorm, lr, bad: bool, skipped_samples: int,
             dropped_tokens: int, step_s: float, tokens: int, samples: int) -> None:
        """One optimiser step's record; tokens and samples are this rank's, skipped_samples
        and dropped_tokens (read but not trained on) the step's over all ranks."""
        self.train_s += step_s
        self.tokens_since += tokens * self.data_parallel
        self.samples_since += samples * self.data_parallel
        if self.metrics:
            self.metrics.write(json.dumps({"step": step, "loss": loss, "lm_loss": lm, "diffusion_loss": diff,
                                           "caption_loss": caption,
                                           **({"align_loss": align} if self.cfg.model.align_encoder else {}),
                                           "grad_norm": gnorm, "lr": lr, "skipped": bad,
                                           "skipped_samples": skipped_samples, "dropped_tokens": dropped_tokens,
                                           "step_s": round(step_s, 4), "train_s": round(self.train_s, 3)}) + "\n")
            self.metrics.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(lm=f"{lm:.3f}", diff=f"{diff:.4f}")
        if self.writer and step % self.cfg.log.every == 0:
            dt = max(time.time() - self.t_last, 1e-9)
            w = self.writer
            w.add_scalar("loss/total", loss, step)
            w.add_scalar("loss/lm", lm, step)
            w.add_scalar("loss/diffusion", diff, step)
            if gnorm is not None:
                w.add_scalar("train/grad_norm", gnorm, step)
            w.add_scalar("train/lr", lr, step)
            w.add_scalar("throughput/tokens_per_s", self.tokens_since / dt, step)
            w.add_scalar("throughput/samples_per_s", self.samples_since / dt, step)
            w.add_scalar("data/skipped_samples", skipped_samples, step)
            w.add_scalar("data/dropped_tokens", dropped_tokens, step)
            peak = self.cfg.log.peak_flops_per_device
            if peak:
                w.add_scalar("throughput/mfu", self.take_flops() / dt / (peak * self.world), step)
            if caption is not None:
                w.add_scalar("loss/caption", caption, step)
            if align is not None:
                w.add_scalar("loss/align", align, step)
            self.t_last, self.tokens_since, self.samples_since = time.time(), 0, 0

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.metrics):
            if thing is not None:
                thing.close()

    # -- model FLOPs ----------------------------------------------------------------
    def count_flops(self, batch) -> None:
        """Add a drawn training batch's model FLOPs (only where log.peak_flops_per_device
        asks for MFU)."""
        if self.cfg.log.peak_flops_per_device:
            self.flops_drawn += self.batch_flops(batch)

    def take_flops(self) -> float:
        """Model FLOPs of the training batches drawn since the last call, over all ranks:
        this rank's batches x the data-parallel size (the ranks of one pipeline draw the
        same batches; data-parallel ranks draw different but alike ones)."""
        drawn, self.flops_drawn = self.flops_drawn, 0.0
        return drawn * self.data_parallel

    def batch_flops(self, batch) -> float:
        """megafusion/flops.py's FORMULA on one packed batch: a text token costs 4 x the
        layer weights when the text tower is frozen (no weight gradient), an image token
        6 x; logits at the text positions; attention over the pairs the hybrid mask
        allows; the image tokenizer's convolutions and projections."""
        from megafusion.flops import attention_pairs_packed, patcher_forward_flops_per_image, train_step_flops

        model = self.model
        if self._patcher_flops is None:
            tok = model.image_tokenizer
            shapes = [(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in tok.named_parameters()]
            self._patcher_flops = 3 * patcher_forward_flops_per_image(shapes, tok.latent_shape[1:], tok.tokens_per_image)
        image_tokens = int((batch.image_ids >= 0).sum())
        text_tokens = int((getattr(batch, "stats", None) or {}).get("tokens", batch.input_ids.numel())) - image_tokens
        images = image_tokens // max(1, model.tokens_per_image)
        logit_tokens = int((model.lm_targets(batch) != -100).sum())
        parts = train_step_flops(model.llama_config, text_tokens=text_tokens, logit_tokens=logit_tokens,
                                 attention_pairs=attention_pairs_packed(batch.document_ids, batch.image_ids),
                                 image_tokens=image_tokens, frozen_text=not self.cfg.model.train_text_tower,
                                 image_io=images * self._patcher_flops)
        return float(parts["total"])
