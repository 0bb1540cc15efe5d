"""Reproducible sampling: image i depends only on seed + i, never on its batch-mates or the process count."""
import numpy as np
import pytest
import torch

from visionformers.diffusion import NoiseSchedule, RectifiedFlow
from visionformers.training import sampling

SCHED = NoiseSchedule("cosine", 100)


class ShrinkModel(torch.nn.Module):
    """eps prediction of N(0, 0.25 I) data: eps = sigma x_t / (alpha^2 0.25 + sigma^2), elementwise per image."""

    def forward(self, x, t, class_labels=None):
        alpha, sigma = SCHED.alpha_sigma(t)
        scale = sigma / (alpha**2 * 0.25 + sigma**2)
        shift = 0.0 if class_labels is None else class_labels.float()[:, None, None, None] * 0.01
        return x * scale[:, None, None, None] + shift


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler"])
def test_image_depends_only_on_its_seed(sampler):
    kw = dict(sched=SCHED, shape=(1, 4, 4), seed=11, sampler=sampler, steps=8)
    labels = torch.arange(5)
    batch = sampling.sample_chunk(ShrinkModel(), range(5), cond={"class_labels": labels},
                                  uncond={"class_labels": labels * 0}, guidance_scale=2.0, **kw)
    alone = sampling.sample_chunk(ShrinkModel(), range(3, 4), cond={"class_labels": labels[3:4]},
                                  uncond={"class_labels": labels[3:4] * 0}, guidance_scale=2.0, **kw)
    assert batch.shape == (5, 1, 4, 4)
    torch.testing.assert_close(batch[3:4], alone, rtol=0, atol=1e-6)
    assert not torch.allclose(batch[2], batch[3])
    # the samples land near the data scale (std 0.5), i.e. the sampler really denoised
    assert 0.2 < sampling.sample_chunk(ShrinkModel(), range(64), **kw).std() < 0.8


def test_flow_image_depends_only_on_its_seed():
    """A stochastic sampler on a flow: image i's per-step noise comes from its own generator (seed + i) too."""
    flow = RectifiedFlow(3.0)
    model = lambda x, t, class_labels: -x * (1 + 0.01 * class_labels.float()[:, None, None, None])  # noqa: E731
    kw = dict(sched=flow, shape=(1, 4, 4), seed=3, sampler="euler_maruyama", steps=6, prediction_type="flow")
    labels = torch.arange(5)
    batch = sampling.sample_chunk(model, range(5), cond={"class_labels": labels}, **kw)
    alone = sampling.sample_chunk(model, range(2, 3), cond={"class_labels": labels[2:3]}, **kw)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sampler='ddim'"):
        sampling.sample_chunk(model, range(1), cond={"class_labels": labels[:1]}, **{**kw, "sampler": "ddim"})


def test_sample_distributed_orders_by_index_and_chunks_by_index():
    made = []

    def inputs(idx):
        made.append(list(idx))
        return {}, None

    images = sampling.sample_distributed(ShrinkModel(), 7, 3, inputs, sched=SCHED, shape=(1, 2, 2), seed=0, steps=2)
    assert made == [[0, 1, 2], [3, 4, 5], [6]] and images.shape == (7, 1, 2, 2)
    one = sampling.sample_chunk(ShrinkModel(), range(6, 7), sched=SCHED, shape=(1, 2, 2), seed=0, steps=2)
    assert torch.equal(images[6:], one)


def test_grid_layout_and_uint8_range():
    images = torch.linspace(-1, 1, 6 * 3 * 4 * 5).reshape(6, 3, 4, 5)
    grid = sampling.make_grid(images, nrow=4, padding=1)
    assert grid.size == (4 * 6 + 1, 2 * 5 + 1) and grid.mode == "RGB"
    arr = sampling.to_uint8(images)
    assert arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255
    gray = sampling.make_grid(images[:, :1], upscale=3)
    assert gray.mode == "L" and gray.size == (3 * (3 * 7 + 2), 3 * (2 * 6 + 2))


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="sampler"):
        sampling.sample_chunk(ShrinkModel(), range(1), SCHED, (1, 2, 2), seed=0, sampler="plms")
