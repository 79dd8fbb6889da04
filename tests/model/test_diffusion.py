import math

import pytest
import torch
from diffusers import DDPMScheduler

from megafusion.model.config import FusionConfig
from megafusion.model.diffusion import (
    DDPMEpsilon,
    RectifiedFlow,
    denoise_step,
    make_objective,
    make_sampler_scheduler,
)

OBJECTIVES = ["ddpm", "rectified_flow"]


def _fixed(n=5, shape=(4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


# --- DDPM ------------------------------------------------------------------------------

def test_ddpm_alphas_cumprod_is_the_cosine_schedule():
    T = 1000

    def alpha_bar(s):  # Nichol & Dhariwal, s = 0.008 offset
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    expected, prod = [], 1.0
    for i in range(T):
        beta = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
        prod *= 1 - beta
        expected.append(prod)
    got = DDPMEpsilon(T).alphas_cumprod.double()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_ddpm_add_noise_matches_diffusers_and_loss_is_mse_to_noise():
    x0, noise = _fixed()
    obj = make_objective(FusionConfig(objective="ddpm"))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([1, 17, 250, 500, 999])
    expected = ref.add_noise(x0, noise, t)
    got = obj.add_noise(x0, noise, t.float())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    torch.testing.assert_close(obj.target(x0, noise, t.float()), noise)
    pred = torch.randn_like(x0)
    by_hand = ((pred - noise) ** 2).sum() / pred.numel()
    torch.testing.assert_close(obj.loss(pred, x0, noise, t.float()), by_hand)


def test_loss_skips_clean_rows_and_applies_weights():
    x0, noise = _fixed(n=4)
    obj = DDPMEpsilon()
    pred = torch.randn_like(x0, requires_grad=True)
    per = ((pred - noise) ** 2).flatten(1).mean(1)
    t = torch.tensor([0.0, 10.0, 0.0, 300.0])
    torch.testing.assert_close(obj.loss(pred, x0, noise, t), (per[1] + per[3]) / 2)
    w = torch.tensor([1.0, 3.0, 1.0, 1.0])
    torch.testing.assert_close(obj.loss(pred, x0, noise, t, weight=w), (3 * per[1] + per[3]) / 4)
    # All clean: an exact zero that still backpropagates (to zero grads).
    loss = obj.loss(pred, x0, noise, torch.zeros(4))
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


# --- rectified flow ---------------------------------------------------------------------

def test_rectified_flow_interpolation_target_and_zero_loss():
    x0, noise = _fixed()
    obj = make_objective(FusionConfig(objective="rectified_flow"))
    assert isinstance(obj, RectifiedFlow)
    t = torch.tensor([0.5, 100.0, 500.0, 900.0, 999.9])
    s = (t / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(obj.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(obj.target(x0, noise, t), noise - x0)
    assert obj.loss(noise - x0, x0, noise, t).item() == 0.0
    assert obj.loss(torch.zeros_like(x0), x0, noise, t).item() > 0.5


# --- timestep sampling and the condition cap -------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_timestep_sampling_and_condition_cap(objective):
    obj = make_objective(FusionConfig(objective=objective))
    T = obj.num_train_timesteps
    n = 4000
    is_cond = torch.arange(n) % 2 == 0
    t = obj.sample_timesteps(is_cond, cap=500, generator=torch.Generator().manual_seed(0))
    assert t.shape == (n,) and t.dtype == torch.float32
    cond, gen = t[is_cond], t[~is_cond]
    assert cond.min() >= 0 and cond.max() <= 500
    assert cond.max() > 450 and cond.min() < 50  # fills [0, cap]
    assert gen.min() > 0 and gen.max() < T  # never clean, inside [0, T)
    assert gen.min() < 0.1 * T and gen.max() > 0.9 * T  # covers the range
    hist = torch.histc(gen, bins=10, min=0, max=T)
    assert torch.all(hist > 0)
    if objective == "ddpm":
        assert torch.equal(t, t.round())
        assert gen.min() >= 1 and gen.max() <= T - 1
        assert hist.min() > 0.6 * hist.max()  # uniform
    else:
        assert hist[4:6].sum() > hist[0] + hist[-1]  # logit-normal: mass in the middle

    # cap 0: every condition image is clean, and add_noise returns it exactly.
    all_cond = torch.ones(64, dtype=torch.bool)
    t0 = obj.sample_timesteps(all_cond, cap=0, generator=torch.Generator().manual_seed(1))
    assert torch.all(t0 == 0)
    x0, noise = _fixed(n=64, shape=(3, 4, 4))
    assert torch.equal(obj.add_noise(x0, noise, t0), x0)

    # Seeded draws are reproducible.
    a = obj.sample_timesteps(is_cond[:50], 500, torch.Generator().manual_seed(3))
    b = obj.sample_timesteps(is_cond[:50], 500, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        obj.sample_timesteps(is_cond, cap=T + 1)


# --- sampling with an oracle ------------------------------------------------------------

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_sampler_with_oracle_recovers_x0(objective):
    cfg = FusionConfig(objective=objective)
    obj = make_objective(cfg)
    x0, noise = _fixed(n=3, shape=(4, 8, 8), seed=7)
    sched = make_sampler_scheduler(cfg, num_inference_steps=10)
    ts = sched.timesteps
    assert ts.min() >= 1 and ts.max() <= obj.num_train_timesteps  # our t, never "clean"

    def oracle(x_t, t):
        if objective == "ddpm":  # the epsilon that puts x_t on the line from x0
            ac = obj.alphas_cumprod[int(t)]
            return (x_t - ac.sqrt() * x0) / (1 - ac).sqrt()
        return noise - x0

    x = noise.clone()  # pure noise
    for t in ts:
        x = denoise_step(sched, oracle(x, t), t, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-3)

    # The oracle is the objective's own target at the objective's own noising.
    t_mid = ts[len(ts) // 2].float().expand(3)
    x_mid = obj.add_noise(x0, noise, t_mid)
    torch.testing.assert_close(oracle(x_mid, ts[len(ts) // 2]), obj.target(x0, noise, t_mid), rtol=0, atol=1e-4)


def test_sampler_refuses_steps_that_reach_clean():
    with pytest.raises(ValueError):
        make_sampler_scheduler(FusionConfig(objective="ddpm"), 1000)
