"""JointTextDenoiser: the denoiser and its trained text encoder as one module (train_unet.py --train_text_encoder)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import visionformers as vf
from visionformers.text.conditioning import TextConditioner, unused_by_encoding
from visionformers.training import checkpoint as ckpt
from visionformers.training.ema import EMA
from visionformers.training.optim import build_optimizer, param_groups
from visionformers.training.text_denoiser import JointTextDenoiser

HERE = Path(__file__).resolve().parent
PROMPTS = ["a zero", "seven on a red ground", ""]


def _joint(encoder="t5_tiny_encoder", seed=0):
    torch.manual_seed(seed)
    text = TextConditioner(encoder, freeze=False)
    unet = vf.create_model("unet_tiny", sample_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2),
                           num_res_blocks=1, attention_resolutions=(4,), attention_head_dim=8, norm_groups=4,
                           context_dim=text.context_dim)
    with torch.no_grad():  # away from the zero-initialised projections, which would hide the text's gradient
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return JointTextDenoiser(unet, text).eval()


def test_captions_are_encoded_then_denoised():
    model = _joint()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0])
    context, mask = model.text_encoder(PROMPTS)
    expected = model.denoiser(x, t, context=context, context_mask=mask)
    torch.testing.assert_close(model(x, t, captions=PROMPTS), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x, t, context=context, context_mask=mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("encoder", ["t5_tiny_encoder", "t5_tiny", "bert_tiny", "gpt_tiny"])
def test_every_trained_parameter_gets_a_gradient(encoder):
    """What DDP needs of a module without find_unused_parameters: parts encoding never runs are frozen, the rest
    (the whole denoiser and the whole encoding path) receives a non-zero gradient."""
    model = _joint(encoder)
    frozen = {id(p) for m in unused_by_encoding(model.text_encoder.encoder) for p in m.parameters()}
    model(torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0]), captions=PROMPTS).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    assert bool(frozen) == (encoder in ("t5_tiny", "bert_tiny"))  # T5's decoder, BERT's pooler (GPT's head is tied)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_ddp_averages_the_text_encoder_gradients():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(HERE / "_joint_ddp_worker.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "JOINT DDP OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_export_writes_the_denoiser_and_the_encoder_as_ema_weights(tmp_path):
    model = _joint()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # the average is now halfway between the initial and the current weights
    ckpt.export_pretrained(model, tmp_path / "model", ema=ema)
    averaged = dict(zip(ema.names, ema.shadow))
    unet, encoder = vf.from_pretrained(tmp_path / "model"), vf.from_pretrained(tmp_path / "model" / "text_encoder")
    for prefix, part in (("denoiser.", unet), ("text_encoder.encoder.", encoder)):
        for name, p in part.named_parameters():
            assert torch.equal(p, averaged[prefix + name]), prefix + name
    assert ckpt.model_config_json(model)["architecture"] == "UNet"


def test_split_state_dict():
    parts = JointTextDenoiser.exported_parts
    state = {"denoiser.a": torch.zeros(1), "text_encoder.encoder.b": torch.ones(1)}
    assert ckpt.split_state_dict(state, parts) == {"": {"a": state["denoiser.a"]},
                                                   "text_encoder": {"b": state["text_encoder.encoder.b"]}}
    with pytest.raises(ValueError, match="'text_encoder.tokens'"):
        ckpt.split_state_dict({**state, "text_encoder.tokens": torch.ones(1)}, parts)


def test_text_encoder_learning_rate_groups():
    model = _joint()
    groups = param_groups(model, 0.1, {"text_encoder": 1e-5})
    encoder = {id(p) for p in model.text_encoder.parameters()}
    assert [("lr" in g, g["weight_decay"]) for g in groups] == [(False, 0.1), (False, 0.0), (True, 0.1), (True, 0.0)]
    assert all((id(p) in encoder) == ("lr" in g) for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    opt = build_optimizer(model, learning_rate=1e-3, lrs={"text_encoder": 1e-5})
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 1e-5, 1e-5]
    with pytest.raises(ValueError, match="lrs"):
        build_optimizer(model, lrs={"vae": 1e-5})
    with pytest.raises(ValueError, match="lrs"):
        build_optimizer(model, lrs={"text_encoder": -1.0})


def test_bad_inputs():
    model = _joint()
    with pytest.raises(ValueError, match="freeze=False"):
        JointTextDenoiser(model.denoiser, TextConditioner("t5_tiny_encoder"))
    with pytest.raises(ValueError, match="context_dim"):
        JointTextDenoiser(model.denoiser, TextConditioner("bert_tiny", freeze=False, dim=32))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3.0])
    context, mask = model.text_encoder(["a"])
    with pytest.raises(ValueError, match="captions"):
        model(x, t, captions=["a"], context=context, context_mask=mask)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 500.0, 999.0])
    grads = []
    for checkpointing in (False, True):
        model = _joint()
        model.set_grad_checkpointing(checkpointing)
        flags = [m.grad_checkpointing for m in model.text_encoder.modules() if hasattr(m, "grad_checkpointing")]
        assert flags and all(f == checkpointing for f in flags)
        model.train()  # checkpointing applies in training: the same dropout draws, replayed in the recomputation
        torch.manual_seed(1)
        model(x, t, captions=PROMPTS).pow(2).mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bf16_autocast_trains_both_parts(device):
    """Mixed precision as accelerate runs it: the encoder's context comes out in bf16 and the denoiser takes it."""
    model = _joint().to(device).train()
    x, t = torch.randn(3, 1, 8, 8, device=device), torch.tensor([1.0, 500.0, 999.0], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(x, t, captions=PROMPTS)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert model.text_encoder.encoder.embed.weight.grad.abs().sum() > 0
