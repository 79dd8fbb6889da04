"""GPUs and networks the planner knows, with the figures it uses and where they come from.

memory: bytes of HBM. usable: what a training process can fill, after the CUDA context,
NCCL's buffers and the caching allocator's fragmentation (reserve, taken as 6 GB: the
context and NCCL take 1-2 GB, fragmentation a few GB at this scale).
peak: dense bf16 tensor-core FLOP/s (the datasheets' sparse figures halved).
nvlink: per-GPU bandwidth in one direction inside a node, as NCCL's bus bandwidth reaches
it on all-gather / reduce-scatter (~80% of the link's figure).
network: per-GPU bandwidth between nodes (one NIC per GPU, rail-optimised), as NCCL's bus
bandwidth reaches it (~80-90% of the NIC's line rate).
hbm: memory bandwidth, for the optimizer step (it streams master weights, moments and
gradients once).
"""
from __future__ import annotations

from dataclasses import dataclass

from megafusion.plan.shapes import PlanError

GB = 1e9
RESERVE = 6 * GB


@dataclass(frozen=True)
class GPU:
    name: str
    memory: float
    peak: float
    nvlink: float
    network: float
    hbm: float
    source: str

    @property
    def usable(self) -> float:
        return self.memory - RESERVE


GPUS = {g.name: g for g in (
    GPU("h100-80gb", 80 * 2**30, 989e12, 360 * GB, 45 * GB, 3.35e12,
        "H100 SXM datasheet: 989 TFLOP/s dense bf16, NVLink 4 450 GB/s per direction, ConnectX-7 400 Gb/s per GPU"),
    GPU("h200", 141 * GB, 989e12, 360 * GB, 45 * GB, 4.8e12,
        "H200 SXM datasheet: 141 GB HBM3e, same compute and links as H100 SXM"),
    GPU("a100-80gb", 80 * 2**30, 312e12, 240 * GB, 22 * GB, 2.0e12,
        "A100 SXM datasheet: 312 TFLOP/s dense bf16, NVLink 3 300 GB/s per direction, 200 Gb/s HDR per GPU"),
    GPU("b200", 180 * GB, 2250e12, 720 * GB, 45 * GB, 8.0e12,
        "B200 datasheet: 2.25 PFLOP/s dense bf16, NVLink 5 900 GB/s per direction, 400 Gb/s per GPU"),
)}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise PlanError(f"--gpu {name}: unknown; one of {', '.join(GPUS)}")
    return GPUS[name]
