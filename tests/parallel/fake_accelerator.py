"""A stand-in accelerator for CPU tests of device placement.

Inside `fake_accelerator()`, tensors moved or created on FAKE (the meta device) are real
CPU tensors wrapped so that `.device` says meta: every operation computes on the CPU,
and its results are on FAKE when an input was (or when it was asked to create them
there). A tensor created without a device (torch.zeros(3), torch.tensor([...])) is a
plain CPU tensor, as it would be next to a CUDA model; and, as CUDA does, an operation
that mixes a FAKE tensor with a CPU tensor of one or more dimensions raises. So code
that puts something on a hard-coded CPU where the module's device belongs shows it,
without a GPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE = torch.device("meta")


class OnFake(torch.Tensor):
    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=FAKE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"OnFake({self.elem!r})"

    def tolist(self):
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("OnFake tensors are only usable inside fake_accelerator()")


def _is_fake(device) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        on_fake = any(isinstance(x, OnFake) for x in flat)
        host = [x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, OnFake) and x.dim() > 0]
        if on_fake and host:
            raise RuntimeError(f"{func}: expected all tensors on one device, got {FAKE} and cpu "
                               f"(a cpu tensor of shape {tuple(host[0].shape)})")
        args, kwargs = tree_map(lambda x: x.elem if isinstance(x, OnFake) else x, (args, kwargs))
        if kwargs.get("device") is not None:  # a factory or a move: the device asked for decides
            on_fake = _is_fake(kwargs["device"])
            if on_fake:
                kwargs["device"] = torch.device("cpu")
        out = func(*args, **kwargs)
        if not on_fake:
            return out
        return tree_map(lambda t: OnFake(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnFake) else t, out)


class _Function(TorchFunctionMode):
    """torch.tensor / torch.as_tensor build their result without the dispatcher seeing the device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _is_fake(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return OnFake(func(*args, **kwargs))
        return func(*args, **kwargs)


class _Autocast(torch.autocast):
    """torch.autocast has no meta device type; code that disables autocast for its
    tensors' device (transformers' RoPE) gets the CPU's."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == FAKE.type else device_type, *args, **kwargs)


@contextlib.contextmanager
def fake_accelerator():
    real = torch.autocast
    torch.autocast = _Autocast
    try:
        with _Function(), _Dispatch():
            yield
    finally:
        torch.autocast = real


def move_to_fake(module: torch.nn.Module) -> torch.nn.Module:
    """module.to(FAKE) inside fake_accelerator(), keeping each Parameter object (as a move
    to CUDA does, by swapping its data), so references held elsewhere move with it."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return module.to(FAKE)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


def tensors_in(obj) -> list[torch.Tensor]:
    return [x for x in tree_flatten(obj)[0] if isinstance(x, torch.Tensor)]
