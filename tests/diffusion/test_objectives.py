"""eps / x0 / v conversions, min-SNR weights, and the training loss."""
import pytest
import torch

import visionformers.diffusion as D


def _alpha_sigma(n):
    angle = torch.rand(n, 1, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.03  # away from 0 and pi/2
    return angle.cos(), angle.sin()  # alpha^2 + sigma^2 = 1


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_conversions_round_trip(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    alpha, sigma = _alpha_sigma(64)
    x_t = alpha * x0 + sigma * eps
    target = D.prediction_target(x0, eps, alpha, sigma, prediction_type)
    x0_hat, eps_hat = D.predict_x0_eps(target, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_v_is_salimans_ho_velocity():
    """v = alpha eps - sigma x0 is d x_phi / d phi for x_phi = cos(phi) x0 + sin(phi) eps (Salimans & Ho 2022, App. D)."""
    x0, eps = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    phi, h = torch.tensor(0.7, dtype=torch.float64), 1e-6
    x_at = lambda p: p.cos() * x0 + p.sin() * eps  # noqa: E731
    velocity = (x_at(phi + h) - x_at(phi - h)) / (2 * h)
    torch.testing.assert_close(D.prediction_target(x0, eps, phi.cos(), phi.sin(), "v"), velocity, rtol=1e-8, atol=1e-8)


def test_min_snr_weights_equal_their_formula():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 20.0, 1e4])
    gamma = 5.0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    torch.testing.assert_close(D.min_snr_weight(snr, gamma, "x0"), clipped)
    torch.testing.assert_close(D.min_snr_weight(snr[1:], gamma, "eps"), clipped[1:] / snr[1:])
    torch.testing.assert_close(D.min_snr_weight(snr, gamma, "v"), clipped / (snr + 1))
    assert D.min_snr_weight(snr[:1], gamma, "eps").item() == 1.0  # the snr -> 0 limit, not 0/0


def _manual_loss(model, x0, sched, prediction_type, gamma, seed):
    """The loss written out from the papers, drawing t and noise in training_loss's order."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, sched.num_train_steps, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = sched.alphas_cumprod[t].float()
    a, s = ab.sqrt()[:, None, None, None], (1 - ab).sqrt()[:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0, "flow": noise - x0}[prediction_type]
    err = (model(a * x0 + s * noise, t.float()) - target).pow(2).mean((1, 2, 3))
    if gamma is not None:
        snr = ab / (1 - ab)
        err = err * {"x0": snr.clamp(max=gamma), "eps": snr.clamp(max=gamma) / snr,
                     "v": snr.clamp(max=gamma) / (snr + 1),
                     # |x0 err| = sigma / (alpha + sigma) |flow err|
                     "flow": snr.clamp(max=gamma) * (1 - ab) / (ab.sqrt() + (1 - ab).sqrt()) ** 2}[prediction_type]
    return err.mean()


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_training_loss_matches_formula(prediction_type, gamma):
    sched = D.NoiseSchedule("cosine", 1000)
    x0 = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: torch.einsum("oc,bchw->bohw", w, x) * torch.cos(t / 700)[:, None, None, None]  # noqa: E731
    loss = D.training_loss(model, x0, sched, prediction_type, gamma, generator=torch.Generator().manual_seed(4))
    assert loss.ndim == 0
    expected = _manual_loss(model, x0, sched, prediction_type, gamma, seed=4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_training_loss_backward_and_cond():
    sched = D.NoiseSchedule("linear", 100)
    net = torch.nn.Conv2d(3, 3, 1)
    seen = {}

    def model(x, t, class_labels=None):
        seen["labels"], seen["t"] = class_labels, t
        return net(x)

    labels = torch.tensor([1, 2])
    loss = D.training_loss(model, torch.randn(2, 3, 4, 4), sched, class_labels=labels)
    loss.backward()
    assert seen["labels"] is labels and seen["t"].dtype == torch.float32 and seen["t"].shape == (2,)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x0 = torch.randn(4, 3, 4, 4)
    assert torch.equal(D.training_loss(net_only := lambda x, t: net(x), x0, sched, generator=g()),
                       D.training_loss(net_only, x0, sched, generator=g()))


def test_offset_noise_adds_a_per_channel_constant():
    sched = D.NoiseSchedule("linear", 1000)
    captured = {}

    def model(x, t):
        captured["x"], captured["t"] = x, t
        return torch.zeros_like(x)

    x0 = torch.zeros(256, 2, 32, 32)  # x_t = sigma_t * noise
    D.training_loss(model, x0, sched, offset_noise=0.5, generator=torch.Generator().manual_seed(0))
    _, sigma = sched.alpha_sigma(captured["t"].long())
    noise = captured["x"] / sigma[:, None, None, None]
    channel_means = noise.mean((2, 3))  # var = 1/(32*32) + 0.5^2
    assert channel_means.std().item() == pytest.approx((1 / 1024 + 0.25) ** 0.5, rel=0.15)
    D.training_loss(model, x0, sched, generator=torch.Generator().manual_seed(0))
    assert (captured["x"] / sigma[:, None, None, None]).mean((2, 3)).std().item() < 0.05


def test_training_loss_bad_inputs():
    sched = D.NoiseSchedule("linear", 100)
    model = lambda x, t: x  # noqa: E731
    x0 = torch.randn(2, 3, 4, 4)
    cases = [
        (dict(prediction_type="epsilon"), r"prediction_type='epsilon'.*'eps'"),
        (dict(min_snr_gamma=0), r"min_snr_gamma=0"),
        (dict(min_snr_gamma=-5.0), r"min_snr_gamma=-5.0"),
        (dict(offset_noise=-0.1), r"offset_noise=-0.1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            D.training_loss(model, x0, sched, **kwargs)
    with pytest.raises(ValueError, match=r"x0="):
        D.training_loss(model, torch.arange(6).reshape(2, 3), sched)
    with pytest.raises(ValueError, match=r"x0="):
        D.training_loss(model, torch.randn(5), sched)
    with pytest.raises(ValueError, match=r"sched="):
        D.training_loss(model, x0, "cosine")
    with pytest.raises(ValueError, match=r"model output=.*\(2, 3, 4, 4\)"):
        D.training_loss(lambda x, t: x[:, :1], x0, sched)
