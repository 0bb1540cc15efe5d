"""Positional schemes against their formulas and the reference implementations (oracles only in tests)."""
import math

import pytest
import torch

from visionformers.nn import (
    FourierFeatures,
    LearnedPositionEmbedding2D,
    RotaryEmbedding,
    RotaryEmbedding2D,
    T5RelativeBias,
    WindowRelativeBias,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    resample_pos_embed,
    sincos_1d,
    sincos_2d,
    t5_relative_position_bucket,
    timestep_embedding,
)


def test_rope_dot_product_depends_only_on_offset():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope(40)
    qs, ks = apply_rotary(q.expand(40, 16), cos, sin), apply_rotary(k.expand(40, 16), cos, sin)
    dots = qs @ ks.T  # (40, 40): entry (m, n) = q_m . k_n
    for offset in (-5, 0, 3, 17):
        diag = torch.diagonal(dots, offset=offset)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), atol=1e-4, rtol=1e-4)
    # rotation preserves norms
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(40), atol=1e-5, rtol=1e-5)


def test_rope_2d_dot_product_depends_only_on_2d_offset():
    rope = RotaryEmbedding2D(16)
    h, w = 5, 7
    cos, sin = rope((h, w), num_prefix_tokens=1)
    assert cos.shape == (1 + h * w, 16)
    torch.testing.assert_close(cos[0], torch.ones(16))  # prefix token is not rotated
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rotary(q.expand(h * w + 1, 16), cos, sin)[1:].view(h, w, 16)
    ks = apply_rotary(k.expand(h * w + 1, 16), cos, sin)[1:].view(h, w, 16)
    for dy, dx in ((0, 1), (1, 0), (2, 3)):
        vals = torch.stack([qs[y + dy, x + dx] @ ks[y, x] for y in range(h - dy) for x in range(w - dx)])
        torch.testing.assert_close(vals, vals[0].expand_as(vals), atol=1e-4, rtol=1e-4)


def test_alibi_matches_reference_formula():
    # Press et al. 2022: for 8 heads the slopes are 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # non power of two: the 8 slopes of 8 heads, then every other slope of 16 heads
    s16 = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor([2.0 ** -(i + 1) for i in range(8)] + s16[0::2][:4]))
    bias = alibi_bias(8, 5, 5)
    i, j = 3, 1
    assert bias[0, 2, i, j].item() == pytest.approx(-(2.0**-3) * abs(i - j))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20)])
def test_t5_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    ours = t5_relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, ref)


def test_t5_relative_bias_offsets_queries_for_decoding():
    bias = T5RelativeBias(4, bidirectional=False)
    full = bias(6, 6)
    last = bias(1, 6)  # one new query at position 5 against 6 keys
    torch.testing.assert_close(last, full[:, :, -1:])


def test_sincos_2d_equals_diffusers_mae_layout():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(64, 6, base_size=6, output_type="pt")
    torch.testing.assert_close(sincos_2d((6, 6), 64), ref.float(), atol=1e-6, rtol=0)


def test_sincos_1d_formula():
    pe = sincos_1d(torch.arange(10), 8)
    pos, i = 7, 1
    assert pe[pos, i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[pos, 4 + i].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    for flip, shift in ((True, 0.0), (False, 1.0)):
        ref = get_timestep_embedding(t, 64, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, 64, flip_sin_to_cos=flip, freq_shift=shift), ref)


def test_fourier_features_formula():
    ff = FourierFeatures(8, scale=2.0)
    t = torch.tensor([0.3])
    ang = 2 * math.pi * 0.3 * ff.weight
    torch.testing.assert_close(ff(t)[0], torch.cat([ang.sin(), ang.cos()]))


def test_resample_equals_timm_and_handles_non_square():
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 14 * 14, 32)
    ours = resample_pos_embed(pe, (10, 18), num_prefix_tokens=1)
    ref = resample_abs_pos_embed(pe, [10, 18], num_prefix_tokens=1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert resample_pos_embed(pe, (14, 14), num_prefix_tokens=1) is pe
    table = LearnedPositionEmbedding2D((4, 6), 16, num_prefix_tokens=2)
    assert table((8, 3)).shape == (1, 2 + 24, 16)
    torch.testing.assert_close(table((8, 3))[:, :2], table.weight[:, :2])
    with pytest.raises(ValueError, match="old_size"):
        resample_pos_embed(torch.randn(1, 10, 4), (3, 3))


def test_window_relative_bias_is_symmetric_in_offsets_and_serves_smaller_windows():
    rb = WindowRelativeBias((3, 3), num_heads=2)
    bias = rb()
    assert bias.shape == (2, 9, 9)
    # tokens (0,0)->(1,1) and (1,1)->(2,2) have the same offset, so the same bias
    assert torch.equal(bias[:, 0, 4], bias[:, 4, 8])
    small = rb((2, 3))  # a 2x3 window reads the rows of its offsets: the top two rows of the 3x3 window
    assert torch.equal(small, bias[:, :6, :6])
