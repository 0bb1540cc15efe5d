"""set_grad_checkpointing(True) on every model family: the same loss and the same gradients, bit for bit."""
import pytest
import torch

import visionformers as vf

UNET = dict(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,), attention_head_dim=8,
            norm_groups=4, sample_size=8, num_classes=3, context_dim=8, dropout=0.2)
TEXT = dict(dim=16, num_heads=2)


def unet_loss(model):
    x, ctx = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8)
    return model(x, torch.tensor([3, 500]), class_labels=torch.tensor([0, 2]), context=ctx,
                 context_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()).square().mean()


def ids(vocab=50, n=6):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))


CASES = {  # name -> (preset, overrides, loss of the model)
    "unet": ("unet_tiny", UNET, unet_loss),
    "dit": ("dit_tiny", dict(num_classes=3, in_channels=4, sample_size=8), lambda m: m(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]),
                                                          class_labels=torch.tensor([0, 2])).square().mean()),
    "gpt": ("gpt_tiny", dict(TEXT, depth=2, vocab_size=300, dropout=0.1), lambda m: m(ids(), labels=ids()).loss),
    "bert": ("bert_tiny_mlm", dict(TEXT, depth=2, vocab_size=300, dropout=0.1), lambda m: m(ids(), labels=ids()).loss),
    "t5": ("t5_tiny", dict(TEXT, vocab_size=300, dropout=0.1), lambda m: m(ids(), ids(n=4)).square().mean()),
    "seq2seq": ("transformer_tiny", dict(TEXT, pos_embedding="relative", max_distance=3, mlp_hidden_dim=32, dropout=0.1),
                lambda m: m(ids(), ids(n=4)).square().mean()),
    "encoder": ("encoder_tiny", dict(TEXT, depth=2, mlp_hidden_dim=32, dropout=0.1), lambda m: m(ids()).logits.square().mean()),
}


def grads_after_step(model, loss_fn, seed):
    torch.manual_seed(seed)  # the same inputs and dropout masks for both runs
    model.zero_grad()
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CASES)
def test_same_gradients_with_checkpointing(name):
    preset, overrides, loss_fn = CASES[name]
    torch.manual_seed(0)
    model = vf.create_model(preset, **overrides).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised outputs would hide the blocks' gradients
    loss, grads = grads_after_step(model, loss_fn, 1)
    model.set_grad_checkpointing(True)
    loss_ckpt, grads_ckpt = grads_after_step(model, loss_fn, 1)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for n in grads:
        assert torch.equal(grads[n], grads_ckpt[n]), n
    model.set_grad_checkpointing(False)
    assert torch.equal(grads_after_step(model, loss_fn, 1)[0], loss)


def saved_bytes(model, loss_fn) -> int:
    """Bytes autograd keeps for the backward pass outside checkpointed regions (their own hooks take those)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    loss.backward()
    return sum(total)


def test_first_step_checkpointed_and_memory_saved():
    # checkpointing from the very first forward (lazily loaded kernels included), and far fewer saved activations
    model = vf.create_model("unet_tiny", **UNET).train()
    model.set_grad_checkpointing(True)
    with_ckpt = saved_bytes(model, unet_loss)
    model.set_grad_checkpointing(False)
    assert with_ckpt < 0.5 * saved_bytes(model, unet_loss)
    with pytest.raises(ValueError, match="enable"):
        model.set_grad_checkpointing("yes")
