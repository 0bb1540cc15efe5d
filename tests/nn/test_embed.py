"""PatchEmbed: the strided convolution is the product of each flattened patch with the flattened kernel (ViT eq. 1)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionformers.nn import PatchEmbed


@pytest.mark.parametrize("img,patch,chans,dim,norm,pad", [
    ((56, 40), 4, 3, 24, True, False),    # a LayerNorm after the convolution
    ((32, 32), 16, 4, 40, False, False),  # no norm
    ((30, 17), 8, 2, 16, True, True),     # padded, non-square
])
def test_tokens_are_flattened_patches_times_the_kernel(img, patch, chans, dim, norm, pad):
    torch.manual_seed(0)
    pe = PatchEmbed(img, patch, chans, dim, pad=pad, strict_img_size=not pad,
                    norm=nn.LayerNorm(dim) if norm else None).eval()
    if norm:
        nn.init.normal_(pe.norm.weight)
        nn.init.normal_(pe.norm.bias)
    x = torch.randn(3, chans, *img).double()
    pe = pe.double()
    gh, gw = pe.grid_for(*img)
    padded = F.pad(x, (0, gw * patch - img[1], 0, gh * patch - img[0]))
    patches = padded.view(3, chans, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(3, gh * gw, -1)
    expected = pe.norm(F.linear(patches, pe.proj.weight.flatten(1), pe.proj.bias))
    with torch.inference_mode():
        got = pe(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
