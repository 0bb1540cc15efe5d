"""The one attention: fused vs math, masks, causality, KV cache, windows, linear and differential variants."""
import math

import pytest
import torch

from visionformers.nn import Attention, DifferentialAttention, KVCache, LinearAttention, attend, attend_math
from visionformers.nn.attention import lambda_init_for_depth, sliding_window_mask
from visionformers.nn.rope import RotaryEmbedding

B, N, M, DIM, H = 2, 7, 5, 32, 4


def fused_and_math(attn, x, **kw):
    attn.eval()
    fused = attn(x, **kw)
    math_out, weights = attn(x, return_weights=True, **kw)
    return fused, math_out, weights


CASES = {
    "plain": (dict(), dict()),
    "padding_mask": (dict(), dict(mask=torch.tensor([[1] * N, [1] * 4 + [0] * 3], dtype=torch.bool))),
    "pair_mask": (dict(), dict(mask=torch.rand(B, N, N) > 0.3)),
    "causal": (dict(), dict(is_causal=True)),
    "bias": (dict(), dict(bias=torch.randn(1, H, N, N))),
    "bias_mask_causal": (dict(), dict(bias=torch.randn(B, H, N, N), is_causal=True,
                                      mask=torch.tensor([[1] * N, [1] * 5 + [0] * 2], dtype=torch.bool))),
    "custom_scale": (dict(scale=1.0), dict()),
    "gqa": (dict(num_kv_heads=2), dict(is_causal=True)),
    "mqa": (dict(num_kv_heads=1), dict()),
    "head_dim": (dict(head_dim=16), dict()),
    "qk_norm": (dict(qk_norm=True), dict()),
    "window": (dict(window_size=3), dict(is_causal=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_matches_math(case):
    init_kw, fwd_kw = CASES[case]
    if "mask" in fwd_kw and fwd_kw["mask"].ndim == 3:
        fwd_kw["mask"][:, :, 0] = True  # every query keeps at least one key
    attn = Attention(DIM, H, qkv_bias=True, attn_drop=0.0, **init_kw)
    x = torch.randn(B, N, DIM)
    fused, math_out, weights = fused_and_math(attn, x, **fwd_kw)
    torch.testing.assert_close(fused, math_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, N), atol=1e-5, rtol=0)


def test_cross_attention_with_context_mask_fused_matches_math():
    attn = Attention(DIM, H, context_dim=24, qkv_bias=True).eval()
    x, ctx = torch.randn(B, N, DIM), torch.randn(B, M, 24)
    ctx_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    fused = attn(x, ctx, mask=ctx_mask)
    ref, w = attn(x, ctx, mask=ctx_mask, return_weights=True)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert torch.all(w[1, :, :, 2:] == 0)


def test_attend_equals_formula():
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    torch.testing.assert_close(attend(q, k, v), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend_math(q, k, v)[0], ref, atol=1e-5, rtol=1e-5)


def test_causal_no_leak():
    attn = Attention(DIM, H).eval()
    x = torch.randn(1, N, DIM)
    out = attn(x, is_causal=True)
    for t in range(N - 1):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        out2 = attn(x2, is_causal=True)
        torch.testing.assert_close(out[:, : t + 1], out2[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1 :], out2[:, t + 1 :])


def test_masked_key_changes_nothing():
    attn = Attention(DIM, H).eval()
    x = torch.randn(1, N, DIM)
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, 3] = False
    x2 = x.clone()
    x2[0, 3] = torch.randn(DIM) * 10
    out, out2 = attn(x, mask=mask), attn(x2, mask=mask)
    keep = [i for i in range(N) if i != 3]
    torch.testing.assert_close(out[:, keep], out2[:, keep], atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_len", [None, 16])
@pytest.mark.parametrize("kv_heads", [H, 2, 1])
@pytest.mark.parametrize("use_rope", [False, True])
def test_kv_cache_decoding_equals_full_causal(max_len, kv_heads, use_rope):
    attn = Attention(DIM, H, num_kv_heads=kv_heads).eval()
    rope = RotaryEmbedding(DIM // H)
    x = torch.randn(B, 10, DIM)
    full = attn(x, is_causal=True, rope=rope(10) if use_rope else None)
    cache, steps = KVCache(max_len), []
    prompt = 4
    steps.append(attn(x[:, :prompt], is_causal=True, kv_cache=cache, rope=rope(prompt) if use_rope else None))
    for t in range(prompt, 10):
        r = rope(1, offset=t) if use_rope else None
        steps.append(attn(x[:, t : t + 1], is_causal=True, kv_cache=cache, rope=r))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_cross_attention_cache_reuses_context():
    attn = Attention(DIM, H, context_dim=DIM).eval()
    x, ctx = torch.randn(B, 3, DIM), torch.randn(B, M, DIM)
    cache = KVCache()
    first = attn(x, ctx, kv_cache=cache)
    again = attn(x, None, kv_cache=cache)  # context no longer needed once cached
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, attn(x, ctx))


def test_kv_cache_overflow_is_value_error():
    attn = Attention(DIM, H).eval()
    cache = KVCache(max_len=4)
    attn(torch.randn(1, 4, DIM), is_causal=True, kv_cache=cache)
    with pytest.raises(ValueError, match="max_len=4"):
        attn(torch.randn(1, 1, DIM), is_causal=True, kv_cache=cache)


@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_covering_sequence_equals_full(causal):
    full = Attention(DIM, H).eval()
    local = Attention(DIM, H, window_size=N).eval()
    local.load_state_dict(full.state_dict())
    x = torch.randn(B, N, DIM)
    torch.testing.assert_close(local(x, is_causal=causal), full(x, is_causal=causal), atol=1e-6, rtol=0)


def test_sliding_window_is_local():
    attn = Attention(DIM, H, window_size=2).eval()
    x = torch.randn(1, N, DIM)
    x2 = x.clone()
    x2[0, 0] += 5.0  # token 0 is outside the window of tokens >= 2
    out, out2 = attn(x, is_causal=True), attn(x2, is_causal=True)
    torch.testing.assert_close(out[:, 2:], out2[:, 2:], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :2], out2[:, :2])
    band = sliding_window_mask(4, 4, 2, is_causal=False)
    assert band.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]


def _linear_reference(q, k, v, causal, key_mask=None):
    phi = lambda z: torch.nn.functional.elu(z) + 1  # noqa: E731
    scores = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, N, N) unnormalised kernel weights
    if causal:
        scores = scores * torch.ones(q.shape[2], k.shape[2]).tril()
    if key_mask is not None:
        scores = scores * key_mask[:, None, None, :]
    return (scores / scores.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_closed_form(causal):
    attn = LinearAttention(DIM, H).eval()
    x = torch.randn(B, N, DIM)
    key_mask = torch.tensor([[1] * N, [1] * 5 + [0] * 2], dtype=torch.bool)
    out = attn(x, is_causal=causal, mask=None if causal else key_mask)
    q, k, v = attn.qkv(x).chunk(3, -1)
    split = lambda t: t.view(B, N, H, -1).transpose(1, 2)  # noqa: E731
    ref = _linear_reference(split(q), split(k), split(v), causal, None if causal else key_mask.float())
    ref = attn.proj(ref.transpose(1, 2).reshape(B, N, DIM))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_differential_attention_matches_its_formula():
    attn = DifferentialAttention(DIM, H, layer_index=3).eval()
    x = torch.randn(B, N, DIM)
    fused = attn(x, is_causal=True)
    ref, _ = attn(x, is_causal=True, return_weights=True)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    # explicit formula, eq. 1-3 of Ye et al. 2024
    d = DIM // H
    q, k, v = attn.qkv(x).chunk(3, -1)
    q = q.view(B, N, 2 * H, d // 2).transpose(1, 2)
    k = k.view(B, N, 2 * H, d // 2).transpose(1, 2)
    v = v.view(B, N, H, d).transpose(1, 2)
    causal = torch.ones(N, N, dtype=torch.bool).tril()

    def smax(qq, kk):
        s = qq @ kk.transpose(-1, -2) / math.sqrt(d // 2)
        return s.masked_fill(~causal, float("-inf")).softmax(-1)

    lam = (torch.exp((attn.lambda_q1 * attn.lambda_k1).sum()) - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum())
           + attn.lambda_init)
    o = (smax(q[:, 0::2], k[:, 0::2]) - lam * smax(q[:, 1::2], k[:, 1::2])) @ v
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.head_norm.weight * (1 - attn.lambda_init)
    ref2 = attn.proj(o.transpose(1, 2).reshape(B, N, DIM))
    torch.testing.assert_close(fused, ref2, atol=1e-5, rtol=1e-5)
    assert attn.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * 3))
    assert lambda_init_for_depth(0) == pytest.approx(0.2)


def test_eval_is_deterministic_with_dropout():
    attn = Attention(DIM, H, attn_drop=0.5, proj_drop=0.5).eval()
    x = torch.randn(B, N, DIM)
    torch.testing.assert_close(attn(x), attn(x), atol=0, rtol=0)
    attn.train()
    assert not torch.equal(attn(x), attn(x))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="dim=30"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        Attention(32, 4, num_kv_heads=3)
    attn = Attention(DIM, H)
    x = torch.randn(B, N, DIM)
    with pytest.raises(ValueError, match="mask="):
        attn(x, mask=torch.ones(B, N + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask="):
        attn(x, mask=torch.zeros(B, N))  # float masks must be passed as bias
    with pytest.raises(ValueError, match="x="):
        attn(torch.randn(B, N, DIM + 1))
    cross = Attention(DIM, H, context_dim=24)
    with pytest.raises(ValueError, match="context="):
        cross(x, torch.randn(B, M, 25))
    with pytest.raises(ValueError, match="context="):
        attn(x, torch.randn(B, M, DIM))
    with pytest.raises(ValueError, match="bias="):
        attn(x, bias=torch.randn(1, H, N, N + 2))
