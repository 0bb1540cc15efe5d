import pytest
import torch

import visionformers as vf
from visionformers.nn import KVCache, RelativeGlobalAttention, TransformerBlock, relative_logits, skew


def naive_relative_attention(attn: RelativeGlobalAttention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """Shaw et al.'s O(N^2 D) form: the full (N, N, D) tensor of relative embeddings, logits q.k + q.E[j - i]."""
    b, n, _ = x.shape
    h, d, m = attn.num_heads, attn.head_dim, attn.max_distance
    q, k, v = attn.qkv(x).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # each (B, H, N, D)
    pos = torch.arange(n)
    dist = (pos[None, :] - pos[:, None]).clamp(-m, 0 if causal else m) + m  # (N, N): key - query
    e = attn.rel_table[:, dist]  # (H, N, N, D)
    logits = (q @ k.transpose(-2, -1) + torch.einsum("bhid,hijd->bhij", q, e)) * d**-0.5
    if causal:
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    out = logits.softmax(-1) @ v  # (B, H, N, D)
    return attn.proj(out.transpose(1, 2).reshape(b, n, h * d))


def test_skew_moves_each_distance_to_its_key():
    nq, nk = 3, 5
    dist = torch.arange(1 - nk, nq).float()  # the columns' distances, 1 - Nk .. Nq - 1
    out = skew(dist.expand(2, nq, -1).clone(), nk)  # (2, Nq, Nk)
    qpos = torch.arange(nk - nq, nk)[:, None]
    assert torch.equal(out[0], (torch.arange(nk)[None, :] - qpos).float())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_distance", [2, 16])  # clipped and unclipped
def test_matches_naive_reference(causal, max_distance):
    torch.manual_seed(0)
    attn = RelativeGlobalAttention(16, 2, max_distance=max_distance, is_causal=causal, qkv_bias=True).eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(attn(x, is_causal=causal), naive_relative_attention(attn, x, causal), atol=1e-5, rtol=1e-5)


def test_relative_logits_match_full_tensor_with_offset():
    # queries at positions 4..6 of 7 keys (a decoding chunk after a cache): the skew places them at the end
    torch.manual_seed(0)
    q, table = torch.randn(1, 2, 3, 4), torch.randn(2, 7, 4)
    got = relative_logits(q, table, 7, 3, causal=False)
    dist = (torch.arange(7)[None, :] - torch.arange(4, 7)[:, None]).clamp(-3, 3) + 3  # (3, 7)
    torch.testing.assert_close(got, torch.einsum("bhid,hijd->bhij", q, table[:, dist]))


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    attn = RelativeGlobalAttention(16, 2, max_distance=3, is_causal=True).eval()
    x = torch.randn(2, 8, 16)
    full = naive_relative_attention(attn, x, causal=True)
    cache = KVCache(max_len=8)
    steps = [attn(x[:, :3], is_causal=True, kv_cache=cache)]
    steps += [attn(x[:, t : t + 1], is_causal=True, kv_cache=cache) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_block_gradients_reach_the_table():
    block = TransformerBlock(16, 2, attn_type="relative", max_distance=4, is_causal=True)
    block(torch.randn(2, 5, 16)).sum().backward()
    assert block.attn.rel_table.grad is not None and block.attn.rel_table.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_max_distance_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_distance"):
        RelativeGlobalAttention(16, 2, max_distance=bad)
    with pytest.raises(ValueError, match="max_distance"):
        vf.create_model("transformer_tiny", pos_embedding="relative", max_distance=bad)


def test_rejects_mismatched_causality_and_cross_attention():
    with pytest.raises(ValueError, match="is_causal"):
        RelativeGlobalAttention(16, 2, is_causal=True)(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="context_dim"):
        RelativeGlobalAttention(16, 2, context_dim=8)
