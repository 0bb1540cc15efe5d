"""GPU-only checks of the models: CUDA matches CPU, bf16 autocast stays close to fp32 and trains, torch.compile
on CUDA matches eager."""
import pytest
import torch

import visionformers as vf

pytestmark = pytest.mark.gpu
DEV = "cuda"
IMAGE_MODELS = {  # name -> (input shape, forward keyword arguments)
    "vit_tiny_patch4_32": ((4, 3, 32, 32), {}),
    "swin_tiny_patch2_window4_32": ((4, 3, 32, 32), {}),
    "unet_tiny": (None, {"t": True}),
    "dit_tiny": (None, {"t": True}),
}


def build(name):
    torch.manual_seed(0)
    model = vf.create_model(name)
    with torch.no_grad():  # zero-initialised heads and output layers would make every comparison trivial
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    if name.startswith(("unet", "dit")):
        c = model.config
        shape = (4, c.in_channels, c.sample_size, c.sample_size)
    else:
        shape = IMAGE_MODELS[name][0]
    return model, shape


def run(model, x, name):
    if name.startswith(("unet", "dit")):
        return model(x, torch.tensor([3, 250, 500, 999], device=x.device))
    return model(x)


@pytest.fixture
def no_tf32(monkeypatch):
    """Plain fp32 products and convolutions on CUDA (PyTorch lets cuDNN use TF32 by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_cuda_forward_matches_cpu(name, no_tf32):
    model, shape = build(name)
    model.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        cpu = run(model, x, name)
        gpu = run(model.to(DEV), x.to(DEV), name)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-4, rtol=2e-4)
    assert gpu.is_contiguous()  # an NCHW input gives an NCHW output on any device


@pytest.mark.parametrize("name", list(IMAGE_MODELS))
def test_bf16_autocast_close_to_fp32_and_trains(name):
    model, shape = build(name)
    model = model.to(DEV).train()
    x = torch.randn(shape, device=DEV)
    with torch.no_grad():
        ref = run(model.eval(), x, name)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(model, x, name)
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, rel  # bf16 keeps ~3 significant digits
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = run(model, x, name).float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["vit_tiny_patch4_32", "swin_tiny_patch2_window4_32", "unet_tiny"])
def test_compile_on_cuda_matches_eager(name):
    model, shape = build(name)
    model = model.to(DEV).eval()
    x = torch.randn(shape, device=DEV)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(run(compiled, x, name), run(model, x, name), atol=1e-3, rtol=1e-3)


def test_gpt_greedy_generation_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = vf.create_model("gpt_tiny").eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    cpu = model.generate(prompt, max_new_tokens=12)
    gpu = model.to(DEV).generate(prompt.to(DEV), max_new_tokens=12)
    assert torch.equal(gpu.cpu(), cpu)
