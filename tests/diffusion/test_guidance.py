"""Classifier-free guidance: one batched forward, equal to two separate passes; scale 1 is the plain model."""
import math

import pytest
import torch

import visionformers.diffusion as D


class CountingModel(torch.nn.Module):
    """A conditional model (B, 3) -> (B, 3) that records the batch size of each call."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 3)
        self.batches = []

    def forward(self, x, t, class_labels, context=None):
        self.batches.append(x.shape[0])
        out = torch.tanh(x) * (1 + self.embed(class_labels)) + 1e-3 * t[:, None]
        return out if context is None else out + context.mean(1)


def test_scale_one_is_the_plain_conditional_model():
    model = CountingModel()
    x, t, labels = torch.randn(4, 3), torch.full((4,), 500.0), torch.tensor([1, 2, 3, 4])
    guided = D.guided_model(model, {"class_labels": labels}, {"class_labels": torch.zeros_like(labels)}, 1.0)
    assert torch.equal(guided(x, t), model(x, t, class_labels=labels))
    assert model.batches == [4, 4]  # no doubled batch at w = 1


@pytest.mark.parametrize("w", [0.0, 2.5, 7.5])
def test_batched_cfg_equals_two_passes(w):
    model = CountingModel()
    x, t = torch.randn(4, 3), torch.full((4,), 321.0)
    cond = {"class_labels": torch.tensor([1, 2, 3, 4]), "context": torch.randn(4, 5, 3)}
    uncond = {"class_labels": torch.zeros(4, dtype=torch.long), "context": torch.zeros(4, 5, 3)}
    guided_out = D.guided_model(model, cond, uncond, w)(x, t)
    assert model.batches == [8]  # one forward on the doubled batch
    c, u = model(x, t, **cond), model(x, t, **uncond)
    torch.testing.assert_close(guided_out, u + w * (c - u), rtol=1e-6, atol=1e-6)


def test_uncond_keys_default_to_the_conditional_values():
    model = CountingModel()
    x, t, ctx = torch.randn(2, 3), torch.full((2,), 10.0), torch.randn(2, 5, 3)
    cond = {"class_labels": torch.tensor([3, 4]), "context": ctx}
    out = D.guided_model(model, cond, {"class_labels": torch.tensor([0, 0])}, 3.0)(x, t)
    c, u = model(x, t, **cond), model(x, t, class_labels=torch.tensor([0, 0]), context=ctx)
    torch.testing.assert_close(out, u + 3.0 * (c - u), rtol=1e-6, atol=1e-6)


def test_sample_with_guidance_scale_one_equals_unguided():
    sched = D.NoiseSchedule("linear", 100)
    model, labels = CountingModel(), torch.tensor([1, 2])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = D.sample(model, (2, 3), sched, steps=5, generator=g(), class_labels=labels)
    same = D.sample(model, (2, 3), sched, steps=5, generator=g(), class_labels=labels,
                    uncond={"class_labels": torch.zeros_like(labels)}, guidance_scale=1.0)
    assert torch.equal(plain, same)
    guided = D.sample(model, (2, 3), sched, steps=5, generator=g(), class_labels=labels,
                      uncond={"class_labels": torch.zeros_like(labels)}, guidance_scale=4.0)
    assert not torch.allclose(plain, guided)
    assert model.batches[-5:] == [4] * 5


def test_guidance_bad_inputs():
    model = CountingModel()
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"uncond=None.*guidance_scale=4.0"):
        D.guided_model(model, {"class_labels": labels}, None, 4.0)
    with pytest.raises(ValueError, match=r"guidance_scale=-0.5"):
        D.guided_model(model, {"class_labels": labels}, {"class_labels": labels}, -0.5)
    with pytest.raises(ValueError, match=r"uncond\['class_labels'\]=None"):
        D.guided_model(model, {"class_labels": labels}, {"class_labels": None}, 4.0)
    with pytest.raises(ValueError, match=r"uncond\['class_labels'\]=Tensor\(shape=\(3,\)"):
        D.guided_model(model, {"class_labels": labels}, {"class_labels": torch.zeros(3, dtype=torch.long)}, 4.0)
    with pytest.raises(ValueError, match=r"uncond\['scale'\]=2"):
        D.guided_model(model, {"class_labels": labels, "scale": 1}, {"class_labels": labels, "scale": 2}, 4.0)


def _guided_runs(sched, prediction_type, sampler, **kwargs):
    torch.manual_seed(0)  # the same embedding weights in every run
    model, labels = CountingModel(), torch.tensor([1, 2, 3])
    out = D.sample(model, (3, 3), sched, sampler=sampler, steps=6, prediction_type=prediction_type,
                   generator=torch.Generator().manual_seed(0), class_labels=labels,
                   uncond={"class_labels": torch.zeros_like(labels)}, **kwargs)
    return out, model.batches


@pytest.mark.parametrize("sched,prediction_type,sampler", [
    (D.NoiseSchedule("linear", 100), "eps", "ddim"), (D.NoiseSchedule("cosine", 100), "v", "heun"),
    (D.RectifiedFlow(3.0), "flow", "euler"), (D.RectifiedFlow(1.0), "flow", "dpmpp_2m")])
def test_guidance_interval_covering_every_level_is_cfg_and_an_empty_one_is_none(sched, prediction_type, sampler):
    plain_cfg, batches = _guided_runs(sched, prediction_type, sampler, guidance_scale=3.0)
    full, full_batches = _guided_runs(sched, prediction_type, sampler, guidance_scale=3.0,
                                      guidance_interval=(0.0, math.inf))
    assert torch.equal(full, plain_cfg) and full_batches == batches
    unguided, _ = _guided_runs(sched, prediction_type, sampler, guidance_scale=1.0)
    empty, empty_batches = _guided_runs(sched, prediction_type, sampler, guidance_scale=3.0,
                                        guidance_interval=(1.0, 1.0))
    assert torch.equal(empty, unguided) and set(empty_batches) == {3}  # never a doubled batch


def test_guidance_interval_guides_exactly_the_levels_inside():
    flow = D.RectifiedFlow(1.0)
    levels = flow.sampling_levels(6)
    ratio = (levels.sigma[:-1] / levels.alpha[:-1]).tolist()  # inf, 4.0, 1.5, ...
    lo, hi = 0.5, 4.5
    _, batches = _guided_runs(flow, "flow", "euler", guidance_scale=3.0, guidance_interval=(lo, hi))
    assert batches == [6 if lo < r <= hi else 3 for r in ratio] and 3 in batches and 6 in batches


def test_cfg_rescale_is_diffusers_rescale_noise_cfg():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    model = CountingModel()
    x, t = torch.randn(4, 3), torch.full((4,), 321.0)
    cond = {"class_labels": torch.tensor([1, 2, 3, 4])}
    uncond = {"class_labels": torch.zeros(4, dtype=torch.long)}
    for phi in (0.0, 0.7, 1.0):
        ours = D.guided_model(model, cond, uncond, 5.0, guidance_rescale=phi)(x, t)
        c, u = model(x, t, **cond), model(x, t, **uncond)
        torch.testing.assert_close(ours, rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=phi),
                                   rtol=1e-6, atol=1e-6)


def test_guidance_interval_and_rescale_bad_inputs():
    model, labels = CountingModel(), torch.tensor([1, 2])
    kw = dict(class_labels=labels, uncond={"class_labels": labels * 0}, guidance_scale=2.0)
    sched = D.NoiseSchedule("linear", 100)
    for bad in ((2.0, 1.0), (-1.0, 1.0), (0.0,), "0 1", (0.0, math.nan)):
        with pytest.raises(ValueError, match=r"guidance_interval="):
            D.sample(model, (2, 3), sched, steps=2, guidance_interval=bad, **kw)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"guidance_rescale="):
            D.sample(model, (2, 3), sched, steps=2, guidance_rescale=bad, **kw)
