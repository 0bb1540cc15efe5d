import pytest
import torch

from visionformers.text.generation import check_generation_args, next_token


def test_greedy_is_argmax():
    logits = torch.randn(4, 10)
    assert torch.equal(next_token(logits), logits.argmax(-1))


def test_top_k_samples_only_the_k_best():
    logits = torch.arange(10.0).repeat(200, 1)  # token 9 best
    out = next_token(logits, do_sample=True, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {7, 8, 9}


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(400, 1)
    out = next_token(logits, do_sample=True, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 >= 0.75 stops there
    out = next_token(logits, do_sample=True, top_p=0.1, generator=torch.Generator().manual_seed(0))
    assert set(out.tolist()) == {0}  # the top token always stays


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    hot = next_token(logits, do_sample=True, temperature=2.0, generator=g).float().mean()
    cold = next_token(logits, do_sample=True, temperature=0.25, generator=g).float().mean()
    assert cold < hot  # fewer picks of token 1 when colder


@pytest.mark.parametrize(
    "args, name",
    [
        ((4, 1.0, None, 0.0, True), "top_p"),
        ((4, 1.0, None, 1.01, False), "top_p"),
        ((4, 0.0, None, None, True), "temperature"),
        ((4, 1.0, 0, None, False), "top_k"),
        ((4, 1.0, 2.5, None, False), "top_k"),
        ((-1, 1.0, None, None, False), "max_new_tokens"),
    ],
)
def test_bad_arguments_name_themselves(args, name):
    with pytest.raises(ValueError, match=name):
        check_generation_args(*args)


def test_temperature_zero_is_fine_for_greedy():
    check_generation_args(4, 0.0, None, None, False)
