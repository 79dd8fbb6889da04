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

@pytest.mark.parametrize("objective,shift,prediction", [("ddpm", 1.0, "epsilon"), ("rectified_flow", 1.0, "epsilon"),
                                                         ("rectified_flow", 3.0, "epsilon"),
                                                         ("rectified_flow", 1.0, "sample"),
                                                         ("rectified_flow", 3.0, "edm")])
def test_sampler_with_oracle_recovers_x0(objective, shift, prediction):
    # The sampler's time and noise conventions are the objective's: an oracle that knows
    # x0 is led back to it. (Latent space: pixel sampling would clip this randn x0.)
    cfg = FusionConfig(objective=objective, image_mode="vae", vae_path="unused", flow_shift=shift,
                       prediction_type=prediction)
    obj = make_objective(cfg)
    x0, noise = _fixed(n=3, shape=(4, 8, 8), seed=7)
    sched = make_sampler_scheduler(cfg, num_inference_steps=10)
    ts = sched.timesteps
    assert ts.min() >= 1 and ts.max() <= obj.num_train_timesteps  # our t, never "clean"
    if objective == "rectified_flow":  # SD3's shift of 1, 0.9, ..., 0.1 (the training's, see above)
        even = torch.linspace(1, 0.1, 10, dtype=torch.float64)
        torch.testing.assert_close(sched.sigmas[:-1].double(), shift * even / (1 + (shift - 1) * even),
                                   rtol=0, atol=1e-6)

    def oracle(x_t, t):
        if objective == "ddpm":  # the epsilon that puts x_t on the line from x0
            ac = obj.alphas_cumprod[int(t)]
            return (x_t - ac.sqrt() * x0) / (1 - ac).sqrt()
        if prediction == "sample":  # x-prediction: the network's answer is x0 itself
            return obj.velocity(x0, x_t, t.float().expand(x_t.shape[0]))
        if prediction == "edm":  # EDM's F target, from EDM's own variables
            f = _edm_f_target(x0, x_t, float(t) / obj.num_train_timesteps, obj.sigma_data)
            return obj.velocity(f, x_t, t.float().expand(x_t.shape[0]))
        return noise - x0

    x = noise.clone()  # pure noise
    for t in ts:
        x = denoise_step(sched, oracle(x, t), t, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-3)

    # The oracle is the objective's own target at the objective's own noising.
    t_mid = ts[len(ts) // 2].float().expand(3)
    x_mid = obj.add_noise(x0, noise, t_mid)
    torch.testing.assert_close(oracle(x_mid, ts[len(ts) // 2]), obj.target(x0, noise, t_mid), rtol=0, atol=1e-4)


def _logit_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """P(sigmoid(u) <= x), u ~ N(0, 1)."""
    return 0.5 * (1 + torch.erf(torch.logit(x.double()) / math.sqrt(2)))


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_shift_moves_training_sigmas_as_sd3(shift):
    """SD3's shifted logit-normal: sigma = s y / (1 + (s - 1) y), y = sigmoid(u), so
    P(sigma <= x) = P(y <= x / (s - (s - 1) x)). The drawn timesteps' empirical CDF must
    follow that closed form (Kolmogorov-Smirnov distance; 20000 draws put the 99.9%
    quantile of the distance near 0.014)."""
    obj = make_objective(FusionConfig(objective="rectified_flow", flow_shift=shift))
    n = 20000
    t = obj.sample_timesteps(torch.zeros(n, dtype=torch.bool), cap=500, generator=torch.Generator().manual_seed(4))
    sigma = (t / obj.num_train_timesteps).double().sort().values
    expected = _logit_normal_cdf(sigma / (shift - (shift - 1) * sigma))
    empirical_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum((empirical_hi - expected).abs(), (empirical_hi - 1 / n - expected).abs()).max()
    assert distance < 0.015, float(distance)
    if shift > 1:  # the point of the shift: more of the training at high noise
        assert (sigma > 0.8).double().mean() > 2 * (1 - _logit_normal_cdf(torch.tensor(0.8)))


def _mode_cdf(x: torch.Tensor, scale: float) -> torch.Tensor:
    """P(y <= x) for SD3's mode sampling y = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u),
    u ~ U(0, 1): f decreases (for these s), so P(y <= x) = 1 - f^-1(x), by bisection."""
    lo, hi = torch.zeros_like(x, dtype=torch.float64), torch.ones_like(x, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - scale * (torch.cos(math.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = torch.where(f > x, mid, lo), torch.where(f > x, hi, mid)
    return 1 - (lo + hi) / 2


@pytest.mark.parametrize("scheme,params,cdf", [
    ("uniform", {}, lambda x: x),
    ("logit_normal", dict(flow_logit_mean=1.0, flow_logit_std=0.5),
     lambda x: 0.5 * (1 + torch.erf((torch.logit(x) - 1.0) / 0.5 / math.sqrt(2)))),
    ("mode", dict(flow_mode_scale=0.8), lambda x: _mode_cdf(x, 0.8)),
])
def test_flow_timesteps_draw_sigma_from_the_chosen_distribution(scheme, params, cdf):
    """model.flow_timesteps: the drawn sigmas follow the scheme's closed-form CDF (KS, as
    above); a positive logit mean trains noisier (the SD3 paper's convention)."""
    obj = make_objective(FusionConfig(objective="rectified_flow", flow_timesteps=scheme, **params))
    n = 20000
    t = obj.sample_timesteps(torch.zeros(n, dtype=torch.bool), cap=500, generator=torch.Generator().manual_seed(5))
    sigma = (t / obj.num_train_timesteps).double().sort().values
    expected = cdf(sigma)
    empirical_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum((empirical_hi - expected).abs(), (empirical_hi - 1 / n - expected).abs()).max()
    assert distance < 0.015, float(distance)
    # Condition images keep their own rule (uniform in [0, cap]).
    tc = obj.sample_timesteps(torch.ones(n, dtype=torch.bool), cap=500, generator=torch.Generator().manual_seed(5))
    assert 0 <= float(tc.min()) and float(tc.max()) <= 500 and abs(float(tc.mean()) - 250) < 10


def test_flow_timesteps_are_checked():
    with pytest.raises(ValueError, match="flow_timesteps='cosmap': expected one of"):
        FusionConfig(objective="rectified_flow", flow_timesteps="cosmap").validate()
    with pytest.raises(ValueError, match="flow_logit_std=0"):
        FusionConfig(objective="rectified_flow", flow_logit_std=0.0).validate()
    with pytest.raises(ValueError, match="flow_timesteps='uniform' is for objective rectified_flow"):
        FusionConfig(objective="ddpm", flow_timesteps="uniform").validate()


def test_sample_prediction_loss_is_the_velocity_loss_of_its_x0():
    """x-prediction (JiT): the velocity of a predicted x0 at x_t is (x_t - x0_hat) / sigma,
    so the velocity loss is |x0_hat - x0|^2 / sigma^2, with sigma clipped at 0.05."""
    obj = make_objective(FusionConfig(objective="rectified_flow", prediction_type="sample"))
    x0, noise = _fixed(n=4, shape=(3, 4, 4), seed=3)
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([10.0, 200.0, 600.0, 990.0])  # sigma 0.01 (clipped to 0.05), 0.2, 0.6, 0.99
    x_t = obj.add_noise(x0, noise, t)
    loss = obj.loss(obj.velocity(x0_hat, x_t, t), x0, noise, t)
    sigma = torch.tensor([0.05, 0.2, 0.6, 0.99])
    per_image = ((x0_hat - x0) ** 2).flatten(1).mean(1) / sigma**2
    clipped_row = ((x_t[0] - x0_hat[0]) / 0.05 - (noise[0] - x0[0])) ** 2  # the clip's own row
    expected = torch.cat([clipped_row.mean()[None], per_image[1:]]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="is for objective rectified_flow"):
        FusionConfig(objective="ddpm", prediction_type="sample").validate()


def _edm_f_target(x0, x_t, s, sigma_data):
    """What an EDM network F should output (Karras et al. 2022, Table 1): in EDM's own
    variables x = x0 + sigma_e n, with x = x_t / (1 - s) and sigma_e = s / (1 - s), the
    denoiser is c_skip x + c_out F(.), c_skip = sd^2 / (sigma_e^2 + sd^2), c_out =
    sigma_e sd / sqrt(sigma_e^2 + sd^2), so F = (x0 - c_skip x) / c_out. Float64; s = 1
    (pure noise, sigma_e infinite) is taken as 1 - 1e-9."""
    s = torch.as_tensor(s, dtype=torch.float64).clamp(max=1 - 1e-9)
    s = s.reshape(-1, *([1] * (x0.dim() - 1))) if s.dim() else s
    sd = float(sigma_data)
    sigma_e, x = s / (1 - s), x_t.double() / (1 - s)
    c_skip = sd ** 2 / (sigma_e ** 2 + sd ** 2)
    c_out = sigma_e * sd / (sigma_e ** 2 + sd ** 2).sqrt()
    return ((x0.double() - c_skip * x) / c_out).to(x0.dtype)


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_velocity_is_that_of_edms_denoiser(sigma_data):
    """prediction_type edm: for any network output F the velocity is (x_t - D) / s, D
    EDM's denoiser c_skip x + c_out F written in EDM's own variables; and F = 0 (the
    zero-initialised head) already gives the best linear x0 estimate, not x_t."""
    obj = make_objective(FusionConfig(objective="rectified_flow", image_mode="vae", vae_path="unused",
                                      prediction_type="edm", sigma_data=sigma_data))
    x0, noise = _fixed(n=5, shape=(3, 4, 4), seed=11)
    f = torch.randn(x0.shape, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([2.0, 100.0, 500.0, 900.0, 998.0])
    s = (t / 1000).double().view(-1, 1, 1, 1)
    x_t = obj.add_noise(x0, noise, t)
    sd = sigma_data
    sigma_e, x = s / (1 - s), x_t.double() / (1 - s)
    denoised = sd ** 2 / (sigma_e ** 2 + sd ** 2) * x + sigma_e * sd / (sigma_e ** 2 + sd ** 2).sqrt() * f.double()
    torch.testing.assert_close(obj.velocity(f, x_t, t).double(), (x_t.double() - denoised) / s, rtol=1e-5, atol=1e-5)
    # At pure noise the velocity of F = x0 / sd is exactly noise - x0: x-prediction there.
    t1 = torch.full((5,), 1000.0)
    torch.testing.assert_close(obj.velocity(x0 / sd, noise, t1), noise - x0, rtol=0, atol=1e-6)


def test_edm_targets_have_unit_variance_and_no_noise_at_high_noise():
    """EDM's design rule, checked on data whose answer is known: for x0 ~ N(0, sd^2) the F
    that yields the true velocity has variance 1 at every noise level, and near pure noise
    it is x0 / sd, uncorrelated with the noise (what a velocity network has to carry
    through its layers and cancel, the velocity target noise - x0 has variance 1 + sd^2
    there and is mostly noise)."""
    sd = 0.5
    obj = make_objective(FusionConfig(objective="rectified_flow", image_mode="vae", vae_path="unused",
                                      prediction_type="edm", sigma_data=sd))
    g = torch.Generator().manual_seed(13)
    n = 200_000
    x0, noise = sd * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64), torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    for sigma in (0.02, 0.3, 0.5, 0.8, 0.999):
        t = torch.full((n,), sigma * 1000, dtype=torch.float64)
        x_t = obj.add_noise(x0, noise, t)
        # Solve velocity(F) = noise - x0 for F: velocity is affine in F with slope
        # velocity(1) - velocity(0).
        v0 = obj.velocity(torch.zeros_like(x0), x_t, t).double()
        slope = obj.velocity(torch.ones_like(x0), x_t, t).double() - v0
        f = ((noise - x0) - v0) / slope
        assert abs(f.var().item() - 1) < 0.02, (sigma, f.var().item())
    corr = torch.corrcoef(torch.stack([f.flatten(), noise.flatten()]))[0, 1].item()
    assert abs(corr) < 0.05 and torch.corrcoef(torch.stack([f.flatten(), x0.flatten()]))[0, 1] > 0.99


def test_edm_prediction_is_checked():
    with pytest.raises(ValueError, match="prediction_type='edm' is for objective rectified_flow"):
        FusionConfig(objective="ddpm", prediction_type="edm").validate()
    with pytest.raises(ValueError, match="sigma_data=0.0 must be > 0"):
        FusionConfig(objective="rectified_flow", prediction_type="edm", sigma_data=0.0).validate()
    with pytest.raises(ValueError, match="sigma_data=0.5 is for model.prediction_type edm"):
        FusionConfig(objective="rectified_flow", sigma_data=0.5).validate()


def test_flow_shift_is_checked():
    with pytest.raises(ValueError, match="flow_shift=0"):
        FusionConfig(objective="rectified_flow", flow_shift=0.0).validate()
    with pytest.raises(ValueError, match="flow_shift=3.0 is for objective rectified_flow"):
        FusionConfig(objective="ddpm", flow_shift=3.0).validate()


def test_epsilon_sampler_never_asks_about_clean_or_near_zero_snr():
    obj = DDPMEpsilon()
    for n in (1, 2, 25, 50, 250, 1000):
        ts = make_sampler_scheduler(FusionConfig(objective="ddpm"), n).timesteps.tolist()
        assert ts == sorted(set(ts), reverse=True) and 1 <= len(ts) <= n
        assert min(ts) == (1 if n > 1 else max(ts)) and min(ts) >= 1  # t = 0 means clean
        # The first step: alpha-bar ~ 1e-3 (SNR e^-7), not the 2.4e-9 of t = 999.
        assert 5e-4 < float(obj.alphas_cumprod[max(ts)]) < 2e-3


# --- the epsilon sampler on data whose optimal epsilon is known in closed form ----------
#
# x0 ~ N(0, s^2 I), x_t = a x0 + b eps (a^2 = alpha-bar, b^2 = 1 - a^2): E[eps | x_t] =
# b x_t / (a^2 s^2 + b^2). Fed that (with a small error), a sound sampler returns samples
# with std s. With guidance g the two branches are data of std s (prompt) and s_u (no
# prompt); in the variables z = x / a, sigma = b / a, the guided probability-flow ODE is
# dz/dsigma = sigma z (g / (s^2 + sigma^2) - (g - 1) / (s_u^2 + sigma^2)), whose exact
# solution from sigma_max to 0 scales z by (s^2 / (s^2 + sm^2))^(g/2) ((s_u^2 + sm^2) / s_u^2)^((g-1)/2).

def _optimal_prediction(alphas_cumprod, x_t, t, data_std, prediction="epsilon"):
    """E[eps | x_t], or E[v | x_t] = a E[eps | x_t] - b E[x0 | x_t] with
    E[x0 | x_t] = a s^2 x_t / (a^2 s^2 + b^2)."""
    ab = alphas_cumprod.double()[int(t)]
    var = ab * data_std ** 2 + 1 - ab
    eps = (1 - ab).sqrt() * x_t.double() / var
    if prediction == "epsilon":
        return eps.float()
    x0 = ab.sqrt() * data_std ** 2 * x_t.double() / var
    return (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()


def _guided_std(alphas_cumprod, t_start, s, s_u, g):
    ab = float(alphas_cumprod.double()[int(t_start)])
    sm2 = (1 - ab) / ab
    return ab ** -0.5 * (s * s / (s * s + sm2)) ** (g / 2) * ((s_u * s_u + sm2) / (s_u * s_u)) ** ((g - 1) / 2)


ERRORS = {
    "plus_0.5%": lambda e: e * 1.005,
    "minus_0.5%": lambda e: e * 0.995,
    "bf16": lambda e: e.bfloat16().float(),
}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("steps", [25, 50, 250])
@pytest.mark.parametrize("data_std", [0.18, 1.0])  # pixel images in [-1, 1]; scaled VAE latents
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_sampler_is_well_conditioned(prediction, data_std, steps, guidance, error):
    # Latent space (no clipping): the closed form holds for unbounded Gaussian data.
    cfg = FusionConfig(objective="ddpm", image_mode="vae", vae_path="unused", prediction_type=prediction)
    sched = make_sampler_scheduler(cfg, steps)
    ac = DDPMEpsilon().alphas_cumprod
    perturb = ERRORS[error]
    s_u = 1.5 * data_std
    x = torch.randn(8192, 4, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        cond = perturb(_optimal_prediction(ac, x, t, data_std, prediction))
        if guidance == 1.0:
            eps = cond
        else:  # both branches carry the error, as a network's would
            uncond = perturb(_optimal_prediction(ac, x, t, s_u, prediction))
            eps = uncond + guidance * (cond - uncond)
        x = denoise_step(sched, eps, t, x)
    expected = data_std if guidance == 1.0 else _guided_std(ac, sched.timesteps[0], data_std, s_u, guidance)
    assert torch.isfinite(x).all()
    assert abs(x.std().item() / expected - 1) < 0.05, (x.std().item(), expected)


def test_v_prediction_target_is_diffusers_velocity():
    x0, noise = _fixed()
    obj = make_objective(FusionConfig(objective="ddpm", prediction_type="v_prediction"))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    t = torch.tensor([1, 17, 250, 500, 999])
    torch.testing.assert_close(obj.target(x0, noise, t.float()), ref.get_velocity(x0, noise, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(obj.add_noise(x0, noise, t.float()), ref.add_noise(x0, noise, t), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        FusionConfig(objective="rectified_flow", prediction_type="v_prediction").validate()


def test_pixel_sampler_clips_the_x0_estimate_to_the_image_range():
    # A useless network (epsilon 0 everywhere) makes every x0 estimate x_t / alpha, ~30x
    # the noise at the first step; for pixel images the sampler keeps samples in [-1, 1].
    cfg = FusionConfig(objective="ddpm", image_mode="pixel")
    sched = make_sampler_scheduler(cfg, 10)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = denoise_step(sched, torch.zeros_like(x), t, x)
    assert x.abs().max() <= 1.0 + 1e-6 and x.abs().max() > 0.5


def test_pixel_sampler_clips_to_the_scaled_image_range():
    # With model.pixel_scale s the images the model sees span [-s, s]: the clip must
    # follow, or every shape's colour would be cut to a fifth of its value at s = 5.
    cfg = FusionConfig(objective="ddpm", image_mode="pixel", pixel_scale=5.0)
    sched = make_sampler_scheduler(cfg, 10)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = denoise_step(sched, torch.zeros_like(x), t, x)
    assert x.abs().max() <= 5.0 + 1e-5 and x.abs().max() > 2.5


# --- bf16 noising -----------------------------------------------------------------------

def test_bf16_noising_keeps_its_coefficients():
    T = 1000
    obj = DDPMEpsilon(T)
    ac = obj.alphas_cumprod.double()
    t = torch.arange(1, T, dtype=torch.float32)
    ones, zeros = torch.ones(T - 1, 1, dtype=torch.bfloat16), torch.zeros(T - 1, 1, dtype=torch.bfloat16)
    noise_coef = obj.add_noise(zeros, ones, t).double().squeeze(1)  # x0 = 0, noise = 1
    signal_coef = obj.add_noise(ones, zeros, t).double().squeeze(1)  # x0 = 1, noise = 0
    torch.testing.assert_close(noise_coef, (1 - ac[1:]).sqrt(), rtol=0.01, atol=0)
    torch.testing.assert_close(signal_coef, ac[1:].sqrt(), rtol=0.01, atol=0)
    x0 = torch.randn(T - 1, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    noise = torch.randn(T - 1, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    x_t = obj.add_noise(x0, noise, t)
    assert x_t.dtype == torch.bfloat16
    assert (x_t != x0).any(1).all()  # every t adds noise, t = 1 included


def test_bf16_rectified_flow_keeps_its_coefficients():
    T = 1000
    obj = RectifiedFlow(T)
    t = torch.cat([torch.arange(1, T, dtype=torch.float32), torch.tensor([999.5, 999.9])])
    sigma = t.double() / T
    n = t.shape[0]
    ones, zeros = torch.ones(n, 1, dtype=torch.bfloat16), torch.zeros(n, 1, dtype=torch.bfloat16)
    torch.testing.assert_close(obj.add_noise(zeros, ones, t).double().squeeze(1), sigma, rtol=0.01, atol=0)
    torch.testing.assert_close(obj.add_noise(ones, zeros, t).double().squeeze(1), 1 - sigma, rtol=0.01, atol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_condition_clean_share(objective):
    obj = make_objective(FusionConfig(objective=objective, condition_clean_share=0.25))
    is_cond = torch.arange(8000) % 2 == 0
    t = obj.sample_timesteps(is_cond, cap=500, generator=torch.Generator().manual_seed(0))
    clean = (t[is_cond] == 0).float().mean().item()
    noisy = t[is_cond][t[is_cond] > 0]
    assert abs(clean - 0.25 - (0.75 / 501 if objective == "ddpm" else 0.0)) < 0.02
    assert noisy.max() > 450 and noisy.min() < 50  # the rest still fills [0, cap]
    assert (t[~is_cond] > 0).all()  # generation images are never clean
    with pytest.raises(ValueError):
        make_objective(FusionConfig(objective=objective, condition_clean_share=1.5))
