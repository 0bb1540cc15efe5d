"""nn.drop: stochastic depth drops whole samples and is the identity in eval."""
import torch

from visionformers.nn import DropPath
from visionformers.nn.drop import drop_path


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    y = drop_path(torch.ones(1000, 3, 4), 0.5, training=True)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 400 < (per_sample[:, 0] == 0).sum() < 600
    assert drop_path(y, 0.5, training=False) is y


def test_drop_path_module_is_identity_in_eval():
    x = torch.randn(4, 3)
    assert torch.equal(DropPath(0.5).eval()(x), x)
