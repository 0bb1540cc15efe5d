"""Noise schedules: published formulas, diffusers tables, zero terminal SNR, q_sample moments, sigma <-> t."""
import math

import pytest
import torch

import visionformers.diffusion as D


@pytest.mark.parametrize("T", [1000, 250, 37])
def test_linear_is_ho_et_al_scaled(T):
    sched = D.NoiseSchedule("linear", T)
    scale = 1000 / T
    assert sched.betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-12)
    assert sched.betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-12)
    steps = sched.betas[1:] - sched.betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (0.02 - 1e-4) * scale / (T - 1)), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0), rtol=0, atol=0)


@pytest.mark.parametrize("T", [1000, 64])
def test_cosine_is_nichol_dhariwal_eq17(T):
    sched = D.NoiseSchedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = sched.betas < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last beta hits the 0.999 clip
    torch.testing.assert_close(sched.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=0)
    assert sched.betas[-1].item() == 0.999


def test_sigmoid_is_jabri_et_al():
    T, start, end = 1000, -3.0, 3.0
    sched = D.NoiseSchedule("sigmoid", T)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    gamma = lambda t: (sig(end) - sig(t * (end - start) + start)) / (sig(end) - sig(start))  # noqa: E731
    expected = torch.tensor([gamma((t + 1) / T) / gamma(0) for t in range(T)], dtype=torch.float64)
    unclipped = sched.betas < 0.999
    torch.testing.assert_close(sched.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-9, atol=0)
    assert (sched.betas > 0).all() and (sched.alphas_cumprod[1:] < sched.alphas_cumprod[:-1]).all()


@pytest.mark.parametrize("kind,theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_match_diffusers(kind, theirs, zero_snr):
    import diffusers
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, rescale_betas_zero_snr=zero_snr)
    sched = D.NoiseSchedule(kind, 1000, zero_terminal_snr=zero_snr)
    # diffusers multiplies 1000 float32 factors; ours is float64, so the tail differs by float32 accumulation only
    torch.testing.assert_close(sched.alphas_cumprod.float(), ref.alphas_cumprod, rtol=5e-5, atol=1e-9)
    if not zero_snr:
        torch.testing.assert_close(sched.betas.float(), ref.betas, rtol=1e-6, atol=1e-8)
    else:
        # diffusers rescales in float32, where 1 - abar_t / abar_(t-1) loses ~6e-8 absolute to cancellation;
        # its (dtype-agnostic) function run in float64 on the same base betas is the exact oracle
        from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

        base = D.NoiseSchedule(kind, 1000).betas
        torch.testing.assert_close(sched.betas, rescale_zero_terminal_snr(base), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(sched.betas.float(), ref.betas, rtol=0, atol=3e-6)


def test_cosine_matches_diffusers_at_other_lengths():
    import diffusers
    for T in (50, 4000):
        ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
        torch.testing.assert_close(D.NoiseSchedule("cosine", T).betas.float(), ref.betas, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", D.SCHEDULES)
def test_zero_terminal_snr_is_lin_et_al_algorithm1(kind):
    base, zsnr = D.NoiseSchedule(kind, 1000), D.NoiseSchedule(kind, 1000, zero_terminal_snr=True)
    old, new = base.alphas_cumprod.sqrt(), zsnr.alphas_cumprod.sqrt()
    assert zsnr.alphas_cumprod[-1] == 0 and zsnr.snr(torch.tensor([999]))[0] == 0
    assert new[0].item() == pytest.approx(old[0].item(), rel=1e-12)
    # an affine map of sqrt(alphas_cumprod): new = (old - old_T) * old_0 / (old_0 - old_T)
    torch.testing.assert_close(new, (old - old[-1]) * old[0] / (old[0] - old[-1]), rtol=1e-9, atol=1e-12)


def test_snr_and_alpha_sigma():
    sched = D.NoiseSchedule("cosine", 1000)
    t = torch.arange(1000)
    alpha, sigma = sched.alpha_sigma(t)
    ab = sched.alphas_cumprod  # float64: 1 - ab in float32 would lose 1e-3 relative at t = 0
    torch.testing.assert_close(alpha, ab.sqrt().float())
    torch.testing.assert_close(sigma, (1 - ab).sqrt().float())
    torch.testing.assert_close(sched.snr(t), (ab / (1 - ab)).float(), rtol=1e-5, atol=0)
    # float t at integer values goes through the log-sigma interpolation and lands on the same table values
    alpha_f, sigma_f = sched.alpha_sigma(t.float())
    torch.testing.assert_close(alpha_f, alpha, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sigma_f, sigma, rtol=1e-5, atol=1e-7)


def test_sigma_t_round_trip():
    sched = D.NoiseSchedule("linear", 1000)
    t = torch.tensor([0.0, 0.25, 3.5, 500.75, 998.1, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    # between two steps log sigma is linear in t (k-diffusion DiscreteSchedule / diffusers _sigma_to_t)
    mid = sched.t_to_sigma(torch.tensor([10.5], dtype=torch.float64)).log()
    assert mid.item() == pytest.approx(0.5 * (sched.log_sigmas[10] + sched.log_sigmas[11]).item(), rel=1e-12)
    assert sched.sigma_to_t(torch.tensor([1e-9, 1e9], dtype=torch.float64)).tolist() == [0.0, 999.0]


def test_q_sample_moments():
    sched = D.NoiseSchedule("linear", 1000)
    n, t_value = 200000, 300
    x0 = torch.full((n, 1), 2.0)
    t = torch.full((n,), t_value)
    x_t = sched.q_sample(x0, t, torch.randn(n, 1, generator=torch.Generator().manual_seed(0)))
    ab = sched.alphas_cumprod[t_value].item()
    assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(ab), abs=4 / math.sqrt(n))
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=4 / math.sqrt(2 * n))
    # per-sample t broadcasts over every trailing dimension
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    a, s = sched.alpha_sigma(t)
    torch.testing.assert_close(sched.q_sample(x0, t, noise), a[:, None, None, None] * x0 + s[:, None, None, None] * noise)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match=r"kind='quadratic'.*'linear'"):
        D.NoiseSchedule("quadratic")
    for bad in (0, 1, 10.0, True):
        with pytest.raises(ValueError, match=r"num_train_steps="):
            D.NoiseSchedule("linear", bad)
    with pytest.raises(ValueError, match=r"num_train_steps=10"):  # DDPM's betas scaled to 10 steps exceed 1
        D.NoiseSchedule("linear", 10)
    sched = D.NoiseSchedule("linear", 100)
    with pytest.raises(ValueError, match=r"noise="):
        sched.q_sample(torch.randn(2, 3), torch.tensor([1, 2]), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"t="):
        sched.q_sample(torch.randn(2, 3), torch.tensor([1, 2, 3]), torch.randn(2, 3))
