"""Where ZeRO++'s quantized weight gathers (qwZ, zero_quantized_weights) can run.

DeepSpeed's int8 kernel quantizes what one rank sends in a gather in groups of a
multiple of 8 elements, and CUDAQuantizer.quantize asserts that the count is one
("Qantized weight requires the number of weights be a multiple of 8"; DeepSpeed issue
#3864, still so in 0.19). A ZeRO-3 rank holds ceil(numel / ranks) elements of each
partitioned parameter, so on a world size that does not divide the layer shapes down
to multiples of 8 the first forward fails: Llama-3 70B's 8192 x 8192 projections work
on 64 or 128 ranks and fail on 48 or 96. Parameters at or below
stage3_param_persistence_threshold stay whole on every rank and are never gathered.
tests/parallel/test_qwz.py runs DeepSpeed's own quantizer code on CPU ranks (a stand-in
for the kernel alone) on both sides of the rule.
"""
from __future__ import annotations

from megafusion.plan.shapes import ModelShape, Param


def qwz_misaligned(shape: ModelShape, ranks: int, persistence: int) -> list[Param]:
    """The gathered parameters whose per-rank share is not a multiple of 8 elements."""
    return [p for p in shape.params if p.numel > persistence and -(-p.numel // ranks) % 8]


def qwz_refusal(shape: ModelShape, ranks: int, persistence: int, *, search: int = 4096) -> str:
    """Why qwZ cannot run on `ranks` ZeRO-3 ranks, in one sentence ('' when it can),
    naming the nearest rank counts that work."""
    bad = qwz_misaligned(shape, ranks, persistence)
    if not bad:
        return ""
    p = bad[0]
    below = next((r for r in range(ranks - 1, 0, -1) if not qwz_misaligned(shape, r, persistence)), None)
    above = next((r for r in range(ranks + 1, search) if not qwz_misaligned(shape, r, persistence)), None)
    near = " or ".join(str(r) for r in (below, above) if r)
    return (f"zero_quantized_weights (qwZ) cannot run on {ranks} ranks: each holds {-(-p.numel // ranks)} "
            f"elements of {p.name} ({p.numel}), not a multiple of 8, which DeepSpeed's int8 quantizer "
            f"asserts at the first gather ({len(bad)} such parameters)"
            + (f"; {near} ranks would do" if near else ""))
