"""tools/gpu_check.py's `kernels` check: whether the optional fused kernels pay.

For the image tower's RMSNorm (model.fused_rmsnorm) and the AdamW step (train.optimizer),
each implementation importable here is timed against the default on the same inputs
(median of timed repeats after warm-ups) and compared with it numerically. An
implementation that is not installed (NVIDIA apex, usually) is recorded as such, not
as a failure; one that is installed and disagrees with the default is a failure.
"""
from __future__ import annotations

import statistics
import time

import torch


def _median_s(fn, warmup: int, timed: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(timed):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _norms(device, dtype, tokens: int, hidden: int, eps: float = 1e-5) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """({name: norm module, or why it is absent}, input, upstream gradient)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from megafusion.model.fused_norm import apex_rmsnorm_class, fused_twin

    g = torch.Generator(device="cpu").manual_seed(0)
    base = LlamaRMSNorm(hidden, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
    x = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    up = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype)
    impls = {"hf_llama": base}
    try:
        impls["apex"] = fused_twin(base, apex_rmsnorm_class())
    except ValueError as exc:
        impls["apex"] = str(exc)
    return impls, x, up


def check_kernels(device, s, adam_kinds: list[str] | None = None) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup, timed = s["warmup"], s["timed"]
    out: dict = {"ok": True, "rmsnorm": {}, "adamw": {}}

    tokens, hidden = (4096, 8192) if device.type == "cuda" else (128, 64)
    impls, x, up = _norms(device, s["dtype"], tokens, hidden)
    ref_y = ref_dx = None
    for name, norm in impls.items():
        if isinstance(norm, str):
            out["rmsnorm"][name] = {"installed": False, "why": norm}
            continue
        x.grad = None
        y = norm(x)
        y.backward(up)
        if ref_y is None:
            ref_y, ref_dx = y.detach().float().clone(), x.grad.detach().float().clone()  # x.grad accumulates below
        err = max((y.detach().float() - ref_y).abs().max().item(), (x.grad.float() - ref_dx).abs().max().item())

        def step(norm=norm):
            norm(x).backward(up)

        out["rmsnorm"][name] = {"installed": True, "fwd_bwd_ms": round(1e3 * _median_s(step, warmup, timed, sync), 3),
                                "max_abs_diff_to_hf": err}
        # bf16 outputs: a few units of roundoff of values of order 1-4.
        if err > (0.05 if s["dtype"] == torch.bfloat16 else 1e-4):
            out["ok"] = False

    n_tensors, numel = (64, 4_194_304) if device.type == "cuda" else (8, 4096)
    g = torch.Generator(device="cpu").manual_seed(1)
    start = [torch.randn(numel, generator=g).to(device) for _ in range(n_tensors)]
    grads = [torch.randn(numel, generator=g).to(device) for _ in range(n_tensors)]
    settings = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def make(kind, params):
        if kind == "torch_fused":
            return torch.optim.AdamW(params, fused=True, **settings)
        if kind == "deepspeed_fused":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **settings)
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **settings)

    reference = None
    # DeepSpeed's and apex's FusedAdam are CUDA kernels: by default only tried on a GPU
    # (tests pass adam_kinds to exercise the comparison with a stand-in).
    if adam_kinds is None:
        adam_kinds = ["torch_fused"] + (["deepspeed_fused", "apex_fused"] if device.type == "cuda" else [])
    for kind in adam_kinds:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        try:
            opt = make(kind, params)
        except Exception as exc:  # not installed, or its op does not build here
            out["adamw"][kind] = {"installed": False, "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        opt.step()
        after = torch.cat([p.detach().float().flatten() for p in params])
        if reference is None:
            reference = after
        err = (after - reference).abs().max().item()
        out["adamw"][kind] = {"installed": True, "step_ms": round(1e3 * _median_s(opt.step, warmup, timed, sync), 3),
                              "params": n_tensors * numel, "max_abs_diff_to_torch_after_one_step": err}
        if err > 1e-5:
            out["ok"] = False
    return out
