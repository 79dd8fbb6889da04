"""Which image-tower parameters partitioned_twin may copy partition by partition
(megafusion/parallel/model_setup.py, _partitions_differ) and which it must gather whole.
Stand-in parameters carry DeepSpeed's partition attributes: the ZeRO++ cases (hpZ's
second, node-local copy; zero_quantized_nontrainable_weights' int8 partitions) and NVMe
offload cannot be built on the CPU, so the decision is checked on what DeepSpeed attaches
to a parameter in those cases (partition_parameters.py: ds_secondary_tensor,
ds_quant_scale on the partition, final_location)."""
from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

from megafusion.parallel.model_setup import _partitions_differ


def partition(n=8, dtype=torch.bfloat16, quantized=False, location=None):
    t = torch.zeros(n, dtype=torch.int8 if quantized else dtype)
    if quantized:
        t.ds_quant_scale = torch.ones(1)
    t.final_location = location
    return t


def param(shape=(4, 4), world=2, rank=0, secondary=None, **kw):
    return SimpleNamespace(ds_shape=torch.Size(shape), ds_numel=shape[0] * shape[1], ds_tensor=partition(**kw),
                           ds_secondary_tensor=secondary, ds_zero_partition_world_size=world,
                           ds_zero_partition_rank=rank)


def test_matching_partitions_are_copied_with_or_without_hpz():
    assert _partitions_differ(param(), param()) is None
    assert _partitions_differ(param(secondary=partition(4)), param(secondary=partition(4))) is None


@pytest.mark.parametrize("text, twin, reason", [
    (param(quantized=True), param(), "quantized"),
    (param(secondary=partition(4, quantized=True)), param(secondary=partition(4)), "quantized"),
    (param(secondary=partition(4)), param(), "ds_secondary_tensor on one side only"),
    (param(location=OffloadDeviceEnum.nvme), param(), "NVMe"),  # what partition_parameters.py sets
    (param(shape=(4, 2)), param(), "shapes"),
    (param(rank=1), param(), "different groups"),
    (param(dtype=torch.float32), param(), "torch.float32"),
])
def test_partitions_that_do_not_correspond_are_gathered(text, twin, reason):
    got = _partitions_differ(text, twin)
    assert got is not None and reason in got, got


def test_an_unpartitioned_parameter_is_gathered():
    assert _partitions_differ(SimpleNamespace(ds_tensor=None), param()) == "no local partition"
