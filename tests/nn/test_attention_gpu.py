"""GPU-only checks of the one attention: bf16 autocast, the flash SDPA kernel, torch.compile on CUDA."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from visionformers.nn import Attention, TransformerBlock, attend, attend_math

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("causal", [False, True])
def test_flash_kernel_path_matches_math(causal):
    q, k, v = (torch.randn(2, 8, 256, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
        out = attend(q, k, v, is_causal=causal)
    ref, _ = attend_math(q.float(), k.float(), v.float(), is_causal=causal)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_gqa_cache_decode_on_gpu_matches_full():
    from visionformers.nn import KVCache

    attn = Attention(256, 8, num_kv_heads=2).to(DEV).eval()
    x = torch.randn(2, 12, 256, device=DEV)
    full = attn(x, is_causal=True)
    cache = KVCache(max_len=12)
    steps = [attn(x[:, :5], is_causal=True, kv_cache=cache)] + [attn(x[:, t : t + 1], is_causal=True, kv_cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_block_close_to_fp32():
    block = TransformerBlock(256, 8, qkv_bias=True, cross_attention=True).to(DEV).eval()
    x, ctx = torch.randn(4, 64, 256, device=DEV), torch.randn(4, 16, 256, device=DEV)
    mask = torch.ones(4, 16, dtype=torch.bool, device=DEV)
    mask[1, 8:] = False
    ref = block(x, context=ctx, context_mask=mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block(x, context=ctx, context_mask=mask)
    assert out.dtype == torch.float32  # the residual stream keeps x's dtype (as in timm); the branches run in bf16
    rel = (out.float() - ref).norm() / ref.norm()
    assert 0 < rel < 1e-2, rel  # bf16 keeps ~3 significant digits; the block as a whole stays within 1%


def test_bf16_training_step_gives_finite_grads():
    block = TransformerBlock(256, 8, norm="rmsnorm", mlp_act="swiglu", is_causal=True).to(DEV)
    x = torch.randn(2, 128, 256, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = block(x).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_compile_on_cuda_matches_eager():
    block = TransformerBlock(256, 8, qkv_bias=True).to(DEV).eval()
    x = torch.randn(2, 64, 256, device=DEV)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-4, rtol=1e-4)
