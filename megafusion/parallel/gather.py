"""Gathering ZeRO-3 partitioned parameters whole, one at a time.

deepspeed.zero.GatheredParameters over several parameters takes DeepSpeed's
_allgather_params_coalesced path, which launches one asynchronous all-gather per
parameter and waits only on the last handle. On CUDA the stream orders them; on the CPU
with gloo the earlier ones may still be in flight when the caller reads the data, and
the gathered values are then silently wrong (measured here: 1-7 of 18 tensors per
rank differed in about half the runs of tests/parallel/test_zero_init.py). A single
parameter takes the sequential path, which waits; gathering each parameter in its own
context keeps the same peak as the caller asked for and is exact on every backend.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None):
    """Like deepspeed.zero.GatheredParameters(params, modifier_rank), exact on gloo.
    Parameters that are not partitioned (no ds_id) are left alone."""
    import deepspeed

    with contextlib.ExitStack() as stack:
        for p in params:
            if hasattr(p, "ds_id"):
                stack.enter_context(deepspeed.zero.GatheredParameters([p], modifier_rank=modifier_rank))
        yield
