"""Around one optimiser step: the stop signal a scheduler sends (SIGUSR1/SIGTERM), the
skip of a non-finite update, and the step's records that the loss does not carry (what
the loader could not train on, the caption and alignment means)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from megafusion.parallel.collectives import any_rank, sum_over_ranks


class StopSignal:
    """SIGUSR1/SIGTERM: finish the current step, checkpoint, exit 0. A second signal
    exits at once. Installed before setup (minutes at 70B): a signal that arrives
    before the first step ends the run with exit 0 and no checkpoint, which is what
    slurm/common.sh requeues on (the default action would kill the rank, and a killed
    rank is not requeued)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.received = 0
        self.install()

    def install(self):
        for s in self.SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.received += 1
        if self.received >= 2:
            os._exit(128 + signum)
        print(f"[rank {os.environ.get('RANK', 0)}] received {signal.Signals(signum).name}: "
              "stopping at the next step boundary (with a checkpoint once a step has run)", file=sys.stderr, flush=True)

    def anywhere(self, device) -> bool:
        """True on every rank when any rank was signalled (ranks must stop together)."""
        return any_rank(bool(self.received), device)


def data_counts(stats: list[dict]):
    """What the loader could not train on in these micro-batches (megafusion/data/packing.py):
    samples skipped, tokens dropped beyond the carry, tokens of documents too long for a row."""
    from collections import Counter

    return Counter({k: sum(int(s.get(k, 0)) for s in stats) for k in ("skipped", "dropped_tokens", "unfit_tokens")})


def step_means(parts: list[float], device) -> tuple[float | None, float | None]:
    """(caption loss weighted by caption targets, mean feature-alignment loss) of one step
    over all ranks; None where there was none."""
    cap, n_cap, align, n_align = sum_over_ranks(parts, device)
    return (cap / n_cap if n_cap > 0 else None), (align / n_align if n_align > 0 else None)


def nan_injection_steps() -> dict[int, set[int] | None]:
    """Test hook: MEGAFUSION_INJECT_NAN_STEPS="3,5.2" makes rank 0's loss NaN in every
    micro-batch of optimiser step 3 and in the second micro-batch of step 5 (tests the
    skip path, also where only part of a step is bad)."""
    steps: dict[int, set[int] | None] = {}
    for item in filter(None, (x.strip() for x in os.environ.get("MEGAFUSION_INJECT_NAN_STEPS", "").split(","))):
        step, _, micro = item.partition(".")
        if not micro:
            steps[int(step)] = None
        elif steps.get(int(step), set()) is not None:
            steps.setdefault(int(step), set()).add(int(micro))
    return steps


def raised_in(tb, filename: str) -> bool:
    """Whether the innermost frame of a traceback is in a file of that name."""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).name == filename


@contextlib.contextmanager
def update_skipped(engine, skip: bool):
    """Around the boundary engine.step(): with skip, DeepSpeed's own overflow path
    (what fp16 loss scaling uses) drops the update whole: the ZeRO optimiser clears the
    gradients and returns before touching weights or Adam's state, and the engine
    counts a skipped step and leaves the lr schedule where it was. In bf16 and fp32 the
    ZeRO optimisers never recompute `overflow` themselves, so it is set here and reset
    after the step."""
    if not skip:
        yield
        return
    opt = engine.optimizer
    if not hasattr(opt, "overflow"):
        raise SystemExit(f"error: a non-finite step cannot be skipped with {type(opt).__name__} "
                         "(parallel.zero_stage=0); use ZeRO stage 1, 2 or 3")
    opt.overflow = True
    try:
        yield
    finally:
        opt.overflow = False
