"""A CPU stand-in for the CUDA kernel behind DeepSpeed's ZeRO++ quantizer (op_builder
QuantizerBuilder, csrc/quantization), so that ZeRO++'s quantized gathers run on CPU
ranks with all of DeepSpeed's Python around them: CUDAQuantizer.quantize's group-size
choice and its asserts, its fp16 conversion, the int8 and scale all-gathers, the
dequantize and the cast back to each parameter's dtype. Only the kernel is replaced:
symmetric int8 per group (q = round(x / s), s = max|x| / 127 per group), fp16 out. The
kernel returns its scales shaped (groups, 1); these are flat (groups,), because gloo's
all-gather checks shapes where NCCL's checks only sizes, and DeepSpeed gathers them
into a flat buffer.

    from cpu_quantizer import install
    kernel = install()      # before the model is built; kernel.calls counts quantizes
"""
import torch


class CPUQuantizerKernel:
    """The quantizer_cuda_module interface CUDAQuantizer calls."""

    Symmetric = 0
    Asymmetric = 1

    def __init__(self):
        self.calls = 0
        self.elements = 0

    def quantize(self, x, groups, bits, quant_type):
        assert bits == 8 and quant_type == self.Symmetric and x.dtype == torch.half, (bits, quant_type, x.dtype)
        g = x.float().reshape(groups, -1)
        scale = g.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(g / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(x.shape)
        self.calls += 1
        self.elements += x.numel()
        return q, scale

    def dequantize(self, q, scale, groups, bits, quant_type):
        assert bits == 8 and quant_type == self.Symmetric
        return (q.reshape(groups, -1).float() * scale.reshape(groups, 1)).reshape(q.shape).half()


def install() -> CPUQuantizerKernel:
    """Make every CUDAQuantizer DeepSpeed creates use the CPU kernel."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    kernel = CPUQuantizerKernel()
    CUDAQuantizer.quantizer_cuda_module = kernel  # __init__ loads the CUDA op only while this is None
    return kernel
