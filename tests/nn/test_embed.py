"""PatchEmbed's CPU inference path (patches times the flattened kernel) against its convolution."""
import pytest
import torch
from torch import nn

from visionformers.nn import PatchEmbed
from visionformers.nn import embed as embed_mod


def _reference(pe: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """The convolution path: what autograd runs (grad enabled)."""
    with torch.enable_grad():
        out = pe(x.requires_grad_(False))
    return out.detach()


@pytest.mark.parametrize("img,patch,chans,dim,norm,pad", [
    ((56, 40), 4, 3, 24, True, False),    # K = 48: the native GEMM with the LayerNorm in its epilogue
    ((32, 32), 16, 4, 40, False, False),  # K = 1024 > GEMM_MAX_K: the library product, no norm
    ((30, 17), 8, 2, 16, True, True),     # padded, non-square
])
def test_product_path_matches_the_convolution(img, patch, chans, dim, norm, pad, monkeypatch):
    torch.manual_seed(0)
    pe = PatchEmbed(img, patch, chans, dim, pad=pad, strict_img_size=not pad,
                    norm=nn.LayerNorm(dim) if norm else None).eval()
    if norm:
        nn.init.normal_(pe.norm.weight)
        nn.init.normal_(pe.norm.bias)
    x = torch.randn(3, chans, *img)
    ref = _reference(pe, x)
    calls = []
    monkeypatch.setattr(pe.proj, "forward", lambda t: calls.append(t) or nn.Conv2d.forward(pe.proj, t))
    with torch.inference_mode():
        got = pe(x)
    assert not calls  # the convolution is not run in inference
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_flat_weight_follows_the_parameter():
    """The kept (D, K) view is the weight's own memory: in-place updates show, a replaced weight is seen."""
    torch.manual_seed(0)
    pe = PatchEmbed(16, 4, 3, 8).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first = pe(x)
        pe.proj.weight.mul_(2)
        twice = pe(x)
        torch.testing.assert_close(twice - pe.proj.bias, 2 * (first - pe.proj.bias), rtol=1e-5, atol=1e-5)
        pe.proj.weight = nn.Parameter(torch.zeros_like(pe.proj.weight))
        torch.testing.assert_close(pe(x), pe.proj.bias.expand(2, 16, 8))
    assert embed_mod.PatchEmbed._flat_weight(pe).data_ptr() == pe.proj.weight.data_ptr()
