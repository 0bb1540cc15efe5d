"""Every text model compiles as one graph (dynamo with the eager backend: tracing only, no inductor build).

Value checks on token ids and labels and the all-True mask shortcut are data-dependent branches; they run
in eager and are skipped while compiling, so ``torch.compile(model, fullgraph=True)`` traces the whole model.
"""
import pytest
import torch

import visionformers as vf

IDS = torch.randint(0, 50, (2, 6))
MASK = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])

CASES = {
    "gpt_tiny": lambda m: m(IDS, labels=IDS).loss,
    "bert_tiny_mlm": lambda m: m(IDS, MASK, labels=IDS).loss,
    "t5_tiny": lambda m: m(IDS, IDS[:, :4], MASK),
    "transformer_tiny": lambda m: m(IDS, IDS[:, :4], MASK),
    "encoder_tiny": lambda m: m(IDS, MASK),
}


def first_tensor(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("train", [False, True])
def test_text_model_compiles_as_one_graph(name, train):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = vf.create_model(name).train(train)
    call = CASES[name]
    torch.manual_seed(1)  # the same dropout draws in both runs
    expected = first_tensor(call(model))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.manual_seed(1)
    out = first_tensor(call(compiled))
    torch.testing.assert_close(out, expected)
    if train:
        out.float().square().sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
