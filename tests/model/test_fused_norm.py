"""model.fused_rmsnorm=apex: the image tower's norms become apex's FusedRMSNorm, the
frozen text tower's stay the base's, and nothing about the model's parameters changes.

apex needs CUDA to build, so these CPU tests check the plumbing with a stand-in module
registered as apex.normalization: a module with apex's constructor signature whose
forward is RMSNorm written out from its definition (x / sqrt(mean(x^2) + eps) * weight,
in fp32). The reference is the same model built without the option: same parameters
(names, values, the very Parameter objects of the norms' weights) and the same loss and
gradients. apex's kernel itself is timed by tools/gpu_check.py where apex is installed.
"""
import sys

import pytest
import torch
import torch.nn as nn
from test_fusion import mixed_batch, pixel_cfg, unzero_output_layer

from megafusion.model.fusion import LMFusionModel
from megafusion.model.loading import load_base_model


class StandInFusedRMSNorm(nn.Module):
    built = []

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.weight = nn.Parameter(torch.ones(normalized_shape)) if elementwise_affine else None
        StandInFusedRMSNorm.built.append(self)

    def forward(self, x):
        xf = x.float()
        y = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * y).to(x.dtype)


@pytest.fixture
def stand_in_apex(apex_stand_in):
    apex_stand_in(normalization={"FusedRMSNorm": StandInFusedRMSNorm})
    StandInFusedRMSNorm.built = []
    return StandInFusedRMSNorm


def test_image_tower_norms_become_apex_and_the_model_is_unchanged(tiny_base_dir, stand_in_apex):
    torch.manual_seed(0)
    plain = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg())
    torch.manual_seed(0)
    fused = LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg(fused_rmsnorm="apex"))
    n_layers = len(fused.layers)

    image_norms = [fused.image_norm] + [n for layer in fused.layers
                                        for n in (layer.image.input_layernorm, layer.image.post_attention_layernorm)]
    text_norms = [fused.text_norm] + [n for layer in fused.layers
                                      for n in (layer.text.input_layernorm, layer.text.post_attention_layernorm)]
    assert all(type(n) is stand_in_apex for n in image_norms) and len(image_norms) == 2 * n_layers + 1
    assert not any(isinstance(n, stand_in_apex) for n in text_norms)
    assert {n.eps for n in image_norms} == {fused.llama_config.rms_norm_eps}
    # The fused modules hold the weights the Llama norms had, not the fresh ones they built.
    assert all(n.weight is not None and not torch.all(n.weight == 1) for n in image_norms)

    plain_sd, fused_sd = plain.state_dict(), fused.state_dict()
    assert list(plain_sd) == list(fused_sd)
    assert all(torch.equal(plain_sd[k], fused_sd[k]) for k in plain_sd)
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == \
        [n for n, p in fused.named_parameters() if p.requires_grad]

    unzero_output_layer(plain)
    with torch.no_grad():  # the same output layer in both
        for (n, p), (_, q) in zip(plain.named_parameters(), fused.named_parameters()):
            q.copy_(p)
    outs = []
    for model in (plain, fused):
        torch.manual_seed(1)
        out = model(mixed_batch(model))
        out.loss.backward()
        outs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = outs
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_apex_the_option_is_a_one_line_error(tiny_base_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex fails, whatever is installed
    with pytest.raises(ValueError) as info:
        LMFusionModel(load_base_model(tiny_base_dir), pixel_cfg(fused_rmsnorm="apex"))
    msg = str(info.value)
    assert "\n" not in msg and "model.fused_rmsnorm=apex" in msg and "github.com/NVIDIA/apex" in msg
    with pytest.raises(ValueError, match="fused_rmsnorm"):
        pixel_cfg(fused_rmsnorm="triton").validate()
