"""The training loop: one object that owns the engine, the loader, checkpoints, signals
and logs. Rank 0 writes <run.dir>/metrics.jsonl (one line per optimiser step, losses
averaged over ranks), val_metrics.jsonl (log.val_every), tensorboard scalars, samples
(log.sample_every, parallel/sampling.py) and the progress bar."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megafusion.config import RunConfig, save_resolved
from megafusion.parallel.ds_config import deepspeed_config
from megafusion.parallel import checkpoint, elastic, frozen
from megafusion.parallel.collectives import any_rank, any_rank_tensor, mean_over_ranks, ranks_where, sum_over_ranks
from megafusion.parallel.launch import device_for, init_distributed, setup_environment
from megafusion.parallel.step_control import (StopSignal, data_counts, nan_injection_steps, raised_in, step_means,
                                               update_skipped)
from megafusion.parallel.step_log import StepLog, drop_steps_after


class SetupError(Exception):
    """A bad input found while the trainer sets up (a ConfigError, DistEnvError or other
    ValueError: a DeepSpeed key the run config owns, a world size that does not fit
    parallel.pipeline_stages, inconsistent rank variables, a data location): its message
    is one line, which megafusion/train.py prints as `error: ...`."""


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir).expanduser()
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- setup ------------------------------------------------------------------
    def _setup(self):
        cfg = self.cfg
        self.env = setup_environment()
        init_distributed(self.env, cfg.parallel.collective_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.data_parallel = self.world // cfg.parallel.pipeline_stages
        self.device = device_for(self.env)
        torch.manual_seed(cfg.run.seed + self.rank)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.ds_config = deepspeed_config(cfg, self.world)
        if self.rank == 0:  # before the base loads: minutes at 70B
            from megafusion.plan import fit_check

            warning = fit_check.memory_warning(cfg, self.world, self.env.local_world_size,
                                               fit_check.device_memory_bytes(self.device))
            if warning:
                print(warning, flush=True)
        # The newest checkpoint written by another number of ranks is loaded through a
        # universal checkpoint (elastic.py), which the engine must know at construction.
        # run.resume=never with no checkpoints there (check_resume) is the same as auto.
        self.resize = elastic.resume_plan(self.ckpt_dir, self.world, cfg.parallel.zero_stage,
                                          cfg.parallel.pipeline_stages)
        if self.resize is not None:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        from megafusion.model.loading import load_tokenizer
        from megafusion.parallel.model_setup import build_model

        self.tokenizer = load_tokenizer(cfg.model.base)
        if cfg.parallel.pipeline_stages > 1:
            from megafusion.parallel.pipeline import initialize_pipeline

            # Each rank builds its own stage only; the rest of self.model stays on the meta device.
            self.model, self.engine, self.optimizer, self.scheduler = initialize_pipeline(cfg, self.ds_config)
        else:
            from megafusion.parallel.engine import initialize

            self.model = build_model(cfg, self.ds_config)
            self.engine, self.optimizer, self.scheduler = initialize(self.model, cfg, self.ds_config)
        from megafusion.parallel import flat_grads

        self.flat_grads = None
        if cfg.parallel.pipeline_stages == 1:
            all_local = self.env.local_world_size == self.env.world_size
            self.flat_grads = flat_grads.attach_flat_gradients(self.engine, cfg, all_local=all_local)
        self.flat_grad_norm = None  # the last step's global gradient norm, from the flat buffer
        if self.flat_grads is not None:
            how = ("in buffers the ranks share in /dev/shm" if self.flat_grads.shared
                   else "by torch.distributed's all-reduce")
            self._log0(f"gradients: one flat buffer of {self.flat_grads.buffer.numel() / 1e6:.1f}M, summed in place "
                       f"{how} and clipped there (parallel.flat_gradients)")

        from megafusion.data.loader import build_train_loader

        self.loader = build_train_loader(cfg.data, cfg.model, self.tokenizer, self.model.tokens_per_image,
                                         self.env, vocab_size=self.model.vocab_size,
                                         replication=cfg.parallel.pipeline_stages)

    def _stopped_before_training(self, stop: StopSignal) -> bool:
        """A stop signal before the first step (every rank agrees): nothing has been
        trained, so nothing is saved; the run exits 0 and resumes where it was."""
        if not stop.anywhere(self.device):
            return False
        self._log0("stopped by signal before the first step; nothing to save, exiting 0")
        dist.barrier()
        return True

    def _log0(self, msg: str):
        if self.rank == 0:
            print(msg, flush=True)

    # -- the loop ---------------------------------------------------------------
    def run(self) -> int:
        # First of all: a preemption signal during the minutes of setup must not kill the
        # rank (see StopSignal).
        stop = StopSignal()
        # Before anything is built: run.resume=never on a directory with checkpoints, or a
        # `latest` naming nothing loadable, is refused in one line (a fresh start's first
        # save would move `latest` back and prune the newer checkpoints).
        checkpoint.check_resume(self.ckpt_dir, self.cfg.run.resume)
        try:
            self._setup()
        except ValueError as exc:  # ConfigError, DistEnvError, a bad data location: input, not a bug
            raise SetupError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
        stop.install()  # again, in case anything in setup replaced the handlers
        if self._stopped_before_training(stop):
            return 0
        cfg, t = self.cfg, self.cfg.train
        start_step = 0
        client = checkpoint.load_latest(self.engine, self.ckpt_dir, self.world, self.resize, cfg.run.seed)
        if self._stopped_before_training(stop):
            return 0
        if client is not None:
            self.loader.load_state_dict(client["loader"])
            start_step = int(client["step"])
            self._log0(f"resumed from {self.ckpt_dir / checkpoint.tag_for(start_step)} at step {start_step}")
            if self.resize is not None:
                self._log0(f"  it was written by {self.resize[1]} ranks and loaded on {self.world} through a "
                           f"universal checkpoint; a step's global batch changes by {self.world}/{self.resize[1]} "
                           "unless train.gradient_accumulation was scaled by the inverse")
        self.bad_in_row = int(client.get("bad_in_row", 0)) if client else 0
        self.skipped_total = int(client.get("skipped_steps", 0)) if client else 0
        if start_step >= t.steps:
            self._log0(f"nothing to do: run.dir already holds step {start_step} >= train.steps={t.steps}")
            return 0
        # Each rank's own frozen shares, hashed before any training step (see frozen.py);
        # checkpoints do not carry them, so the resume above left them as built.
        frozen_before = frozen.digest(self.engine.module)
        if self.rank == 0 and start_step > 0:
            # Validation records of steps this attempt redoes (an earlier one validated
            # them after its last checkpoint) would appear twice.
            drop_steps_after(self.run_dir / "val_metrics.jsonl", start_step)

        self.log = log = StepLog(cfg, self.run_dir, self.rank, self.world, self.data_parallel, self.model, start_step)
        inject = nan_injection_steps()
        # iter() draws DataLoader's base seed from the global RNG: create the iterator
        # before restoring the RNG so that a resumed run continues the very same stream
        # of random numbers (noise) as the uninterrupted one.
        self._it = iter(self.loader)
        if client is not None:
            checkpoint.set_rng_state(client["rng"])
        reported = False
        stopping = False
        step = start_step
        last_saved = None
        while step < t.steps:
            t_step = time.perf_counter()
            # The lr this step's update uses: the engine steps the schedule after it.
            lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else t.lr
            if cfg.parallel.pipeline_stages > 1:
                losses, tokens, data, samples, bad = self._pipeline_step()
                caption = align = None  # the pipeline's last stage reports total, LM and diffusion only
            else:
                losses, tokens, data, samples, bad, parts = self._zero_step(inject.get(step + 1, set()))
                caption, align = step_means(parts, self.device)
            step += 1
            if bad and cfg.parallel.pipeline_stages > 1:
                # DeepSpeed's pipeline engine steps the optimizer inside train_batch: the
                # update cannot be skipped (fp32 applied it; bf16's optimizer refused a
                # non-finite norm), so the run stops before anything is saved.
                print(f"error: step {step}: non-finite loss under pipeline stages, where the update cannot be "
                      f"skipped; stopping without a checkpoint (the last complete one stays latest)",
                      file=sys.stderr, flush=True)
                return 1
            if bad:
                self.bad_in_row += 1
                self.skipped_total += 1
                self._log0(f"step {step}: non-finite loss, update skipped ({self.bad_in_row} in a row)")
                if self.bad_in_row >= t.max_bad_steps:
                    print(f"error: {self.bad_in_row} consecutive steps with a non-finite loss, the last at step {step}; stopping",
                          file=sys.stderr, flush=True)
                    return 1
            else:
                self.bad_in_row = 0
            if not reported:
                self._report_memory()
                reported = True
            mean = [sum(c) / len(losses) for c in zip(*losses)] if losses else [float("nan")] * 3
            # Pipeline losses are already global (broadcast by the engine / reduced above).
            loss, lm, diff = mean if cfg.parallel.pipeline_stages > 1 else mean_over_ranks(mean, self.device)
            step_s = time.perf_counter() - t_step
            gnorm = None if bad else self.flat_grad_norm if self.flat_grads is not None else self.engine.get_global_grad_norm()
            # Over the ranks that draw different samples (a pipeline's stages draw the same).
            skipped, dropped = (round(v / cfg.parallel.pipeline_stages) for v in sum_over_ranks(
                [data["skipped"], data["dropped_tokens"] + data["unfit_tokens"]], self.device))
            log.step(step, loss=loss, lm=lm, diff=diff, caption=caption, align=align,
                     gnorm=float(gnorm) if gnorm is not None else None, lr=lr, bad=bad,
                     skipped_samples=skipped, dropped_tokens=dropped, step_s=step_s, tokens=tokens, samples=samples)
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                self._sample(step, log.writer)
            if cfg.log.val_every and step % cfg.log.val_every == 0:
                self._validate(step, log.writer)
            stopping = stop.anywhere(self.device)
            if stopping or step == t.steps or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                self._save(step)
                last_saved = step
            if stopping:
                self._log0(f"stopped by signal after step {step}; checkpoint written, exiting 0")
                break
        log.close()
        if last_saved != step:
            self._save(step)
        if stopping:
            # A preemption's signal window is for the checkpoint alone; the next
            # attempt checks its own frozen shares at its end.
            dist.barrier()
            return 0
        checked = frozen.check_unchanged(self.engine.module, frozen_before, self.device)
        self._log0(f"frozen check: {checked} frozen tensors on rank 0 bitwise unchanged since start-up (all ranks agree)")
        self._log0(f"done: step {step}; checkpoints in {self.ckpt_dir}, tensorboard in {self.run_dir / 'tensorboard'}")
        dist.barrier()
        return 0

    def _next_batch(self):
        # Data loading must not touch the global RNG that draws the diffusion noise:
        # DataLoader draws a base seed from it when an iterator starts (lazily, at the
        # first next()), which a resumed run would do at a different step.
        with torch.random.fork_rng(devices=[]):
            batch = next(self._it, None)
            if batch is None:  # epoch boundary: streaming starts the next epoch
                self._it = iter(self.loader)
                batch = next(self._it)
        self.log.count_flops(batch)
        return batch

    def _zero_step(self, inject_nan: set[int] | None):
        """One optimiser step of gradient_accumulation micro-batches.

        Every micro-batch runs forward, backward and engine.step() on every rank,
        whatever its loss, so DeepSpeed's accumulation boundary (its own micro-step
        counter, not saved in checkpoints) stays on the optimiser step. The verdict is
        taken once per optimiser step over all ranks: if any micro-batch of the step had
        a non-finite loss anywhere, the update at the boundary is skipped whole."""
        losses, tokens, samples, data = [], 0, 0, data_counts([])
        # Sum of caption-target losses, number of caption targets; sum of feature-alignment
        # losses, micro-batches that had one.
        caption = [0.0, 0.0, 0.0, 0.0]
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        n = self.cfg.train.gradient_accumulation
        bad = False
        for i in range(n):
            batch = self._next_batch()
            stats = getattr(batch, "stats", {}) or {}
            data += data_counts([stats])
            out = self.engine(batch.to(self.device))
            nan = self.rank == 0 and (inject_nan is None or i + 1 in inject_nan)
            loss = out.loss * float("nan") if nan else out.loss
            nonfinite |= ~torch.isfinite(loss.detach())
            if self.flat_grads is not None and i == 0:
                self.flat_grads.attach()
            self.engine.backward(loss)
            if i == n - 1:
                if self.flat_grads is not None:
                    self.flat_grad_norm = self.flat_grads.all_reduce()
                bad = any_rank_tensor(nonfinite)
                with update_skipped(self.engine, bad):
                    self.engine.step()
            else:
                self.engine.step()
            losses.append([out.loss.item(), out.lm_loss.item(), out.diffusion_loss.item()])
            if out.n_caption_targets:
                caption[0] += out.caption_loss.item() * out.n_caption_targets
                caption[1] += out.n_caption_targets
            if out.align_loss is not None:
                caption[2] += out.align_loss.item()
                caption[3] += 1
            tokens += int(stats.get("tokens", batch.input_ids.numel()))
            samples += int(getattr(batch, "num_samples", batch.input_ids.shape[0]))
        if bad:
            losses, caption = [], [0.0] * 4
        return losses, tokens, data, samples, bad, caption

    def _pipeline_step(self):
        """DeepSpeed's pipeline engine runs forward, backward and the update in one call.
        Every rank draws the step's micro-batches (ranks of one pipeline read the same
        samples, streaming replication), so loader states advance alike; the first and
        last stages feed them to the engine."""
        from megafusion.parallel.pipeline import HeadStage, batch_to_inputs

        batches = [self._next_batch() for _ in range(self.cfg.train.gradient_accumulation)]
        heads = [m for m in self.engine.module.modules() if isinstance(m, HeadStage)]
        for h in heads:
            h.records = []
        feed = iter([(batch_to_inputs(b.to(self.device)), torch.zeros(1)) for b in batches])
        try:
            total = float(self.engine.train_batch(data_iter=feed))
        except AssertionError:
            # BF16_Optimizer asserts a positive global gradient norm before it steps; a
            # non-finite one (the same on every rank) fails it: a non-finite step.
            if not raised_in(sys.exc_info()[2], "bf16_optimizer.py"):
                raise
            total = float("nan")
        stats = [getattr(b, "stats", {}) or {} for b in batches]
        # lm / diffusion live on the last stage: sum over last-stage ranks, divide by
        # their number (the data-parallel size); other ranks add zeros.
        parts = [0.0, 0.0, 0.0]
        if heads and heads[0].records:
            parts = [*torch.stack(heads[0].records).double().mean(0)[1:].tolist(), 1.0]
        parts = sum_over_ranks(parts, self.device)
        lm, diff = parts[0] / parts[2], parts[1] / parts[2]
        bad = not math.isfinite(total)
        losses = [] if bad else [[total, lm, diff]]
        return (losses, sum(int(s.get("tokens", b.input_ids.numel())) for s, b in zip(stats, batches)),
                data_counts(stats), sum(int(getattr(b, "num_samples", 0)) for b in batches), bad)

    # -- samples and validation ---------------------------------------------------
    def _sample(self, step: int, writer):
        """Every rank takes part (ZeRO-3 gathers are collective); rank 0 writes."""
        if self.cfg.parallel.pipeline_stages > 1:
            if not getattr(self, "_sample_note", False):
                self._log0("note: log.sample_every is not run with pipeline stages (the model is split across "
                           "ranks); sample from a checkpoint with tools/generate.py --model RUN_DIR")
                self._sample_note = True
            return
        if getattr(self, "_sampler", None) is None:
            from megafusion.parallel.sampling import TrainingSampler

            self._sampler = TrainingSampler(self.cfg, self.engine, self.tokenizer, self.run_dir, self.rank)
        t0 = time.time()
        path = self._sampler(step, writer)
        # Rank 0 may sample alone for minutes (log.sample_eval_n) while the others return
        # at once: they wait here, so that what follows starts together. Validation's
        # first loader is built by streaming's local leader while the other ranks wait
        # at most its download_timeout (60 s) for the index: without this wait a
        # non-zero rank gave up ("took too long to download") and killed the run.
        any_rank(False, self.device)
        if path is not None:
            self._log0(f"step {step}: samples in {path} ({time.time() - t0:.0f} s, weights: {self._sampler.mode})")

    def _validate(self, step: int, writer):
        """Mean LM and diffusion loss over log.val_batches micro-batches per rank of
        data.val, with fixed noise (seeded per batch and rank), so that successive values
        are comparable; no gradients, the global RNG untouched."""
        if self.cfg.parallel.pipeline_stages > 1 or not self.cfg.data.val_streams():
            if not getattr(self, "_val_note", False):
                self._log0("note: log.val_every needs data.val and no pipeline stages; validation skipped")
                self._val_note = True
            return
        from megafusion.data.loader import build_val_loader

        if getattr(self, "_val_loader", None) is None:
            self._val_loader = build_val_loader(self.cfg.data, self.cfg.model, self.tokenizer,
                                                self.model.tokens_per_image, self.env, vocab_size=self.model.vocab_size)
        module = self.engine.module
        was_training = module.training
        module.eval()
        sums = [0.0] * 5  # lm, diffusion, batches, caption sum, caption targets
        try:
            # iter() draws DataLoader's base seed from the global RNG: inside the fork as well.
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                it = iter(self._val_loader)
                first = next(it, None)
                # Agreed before any forward: a rank that raised alone would leave the others
                # waiting in ZeRO-3's gathers until the collective timeout (30 min by default).
                empty = ranks_where(first is None, self.device)
                if empty:
                    raise SystemExit(f"error: data.val yields no batches on rank(s) {empty} of {self.world} "
                                     "(every sample dropped, or fewer samples than ranks); see data.val")
                for i in range(self.cfg.log.val_batches):
                    batch = first if i == 0 else next(it, None)
                    if batch is None:  # fewer val batches than asked: go round again
                        it = iter(self._val_loader)
                        batch = next(it)
                    b = batch.to(self.device)
                    g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + i * self.world + self.rank)
                    shape = (b.images.shape[0], *module.image_tokenizer.latent_shape)
                    noise = torch.randn(shape, generator=g).to(self.device)
                    out = self.engine(b, noise=noise)
                    n_cap = int(out.n_caption_targets or 0)
                    cap = out.caption_loss.item() * n_cap if n_cap else 0.0
                    sums = [a + b for a, b in zip(sums, [out.lm_loss.item(), out.diffusion_loss.item(), 1.0, cap, n_cap])]
        finally:
            module.train(was_training)
        sums = sum_over_ranks(sums, self.device)
        lm, diff = sums[0] / sums[2], sums[1] / sums[2]
        caption = sums[3] / sums[4] if sums[4] > 0 else None
        self._log0(f"step {step}: validation lm {lm:.4f} diffusion {diff:.4f}"
                   + (f" caption {caption:.4f}" if caption is not None else ""))
        if writer:
            writer.add_scalar("val/lm", lm, step)
            writer.add_scalar("val/diffusion", diff, step)
            writer.add_scalar("val/total", self.cfg.model.lm_loss_weight * lm + self.cfg.model.diffusion_loss_weight * diff, step)
            if caption is not None:
                writer.add_scalar("val/caption", caption, step)
        if self.rank == 0:
            with open(self.run_dir / "val_metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "val_lm_loss": lm, "val_diffusion_loss": diff,
                                    "val_caption_loss": caption}) + "\n")

    # -- pieces -----------------------------------------------------------------
    def _save(self, step: int):
        client = {"loader": self.loader.state_dict(), "bad_in_row": self.bad_in_row,
                  "skipped_steps": self.skipped_total}
        checkpoint.save(self.engine, self.ckpt_dir, step, client, self.cfg.checkpoint.keep_last)

    def _report_memory(self):
        from megafusion.parallel.memory import report

        text = report(self.engine, self.world, self.flat_grads.buffer if self.flat_grads is not None else None)
        self._log0(text)
