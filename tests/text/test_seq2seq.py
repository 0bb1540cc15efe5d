import math

import pytest
import torch

import visionformers as vf
from visionformers.nn import KVCache
from visionformers.text.seq2seq import INIT_METHODS, POSITIONAL_SCHEMES


def make(pos="sinusoidal", pre_norm=False, **kw):
    # untied output, unscaled embeddings and large random weights: otherwise a random network mostly echoes
    # its last input token, and a greedy comparison would check little
    model = vf.create_model(
        "transformer_tiny", pos_embedding=pos, pre_norm=pre_norm, dropout=0.0, tie_embeddings=False,
        scale_embeddings=False, **kw,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "embed.weight":
                p.normal_(0, 0.3)
    return model


def greedy_without_cache(model, ids, mask, steps):
    dec = torch.full((ids.shape[0], 1), model.config.bos_token_id)
    for _ in range(steps):
        nxt = model(ids, dec, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
        dec = torch.cat([dec, nxt], dim=1)
    return dec


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("pos", POSITIONAL_SCHEMES)
def test_cached_generation_equals_recomputation(pos, pre_norm):
    model = make(pos, pre_norm)
    ids = torch.randint(0, 256, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    expected = greedy_without_cache(model, ids, mask, 8)
    eos = next(i for i in range(261) if not (expected == i).any())  # an eos never emitted: all 8 steps run
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos_token_id=eos), expected)


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("pos", POSITIONAL_SCHEMES)
def test_cached_decoding_matches_full_forward(pos, pre_norm):
    # teacher-forced random targets: a prefix chunk, then one token per step, against one full forward
    model = make(pos, pre_norm)
    ids, dec = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 8))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = False
    full = model(ids, dec, attention_mask=mask)
    memory = model.encode(ids, mask)
    caches, cross = [KVCache(max_len=8) for _ in range(2)], [KVCache() for _ in range(2)]
    steps = [model.decode(dec[:, :3], memory, mask, caches, cross)]
    steps += [model.decode(dec[:, t : t + 1], memory, mask, caches, cross) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos", POSITIONAL_SCHEMES)
def test_decoder_is_causal_and_encoder_sees_all(pos):
    model = make(pos)
    ids, dec = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 6))
    changed = dec.clone()
    changed[0, 3:] = (changed[0, 3:] + 1) % 256
    torch.testing.assert_close(model(ids, dec)[:, :3], model(ids, changed)[:, :3])
    src = ids.clone()
    src[0, -1] = (src[0, -1] + 1) % 256
    assert not torch.allclose(model.encode(ids)[:, 0], model.encode(src)[:, 0])


@pytest.mark.parametrize("pos", ["learned", "rope", "t5"])
def test_positions_matter(pos):
    model = make(pos)
    ids = torch.randint(0, 256, (1, 6))
    states = model.encode(torch.cat([ids, ids], 1))  # same tokens, different positions
    assert not torch.allclose(states[:, :6], states[:, 6:])


@pytest.mark.parametrize("init", INIT_METHODS)
def test_init_methods(init):
    """Each method's std on a wide (256, 64) and a square (64, 64) weight: xavier sqrt(2 / (out + in)),
    small_init sqrt(2 / 5d) (the two coincide on the wide one, so the square one tells them apart)."""
    torch.manual_seed(0)
    model = vf.create_model("transformer_tiny", init=init, dim=64)
    block = model.encoder.blocks[0]
    for w in (block.mlp.fc1.weight, block.attn.proj.weight):
        expected = {
            "xavier": math.sqrt(2 / (w.shape[0] + w.shape[1])),
            "normal_0.02": 0.02,
            "small_init": math.sqrt(2 / (5 * 64)),
        }[init]
        assert abs(w.std().item() - expected) / expected < 0.1, (tuple(w.shape), w.std().item(), expected)
    assert block.mlp.fc1.bias.abs().max() == 0


def test_classifier_mean_pooling_ignores_padding():
    model = vf.create_model("encoder_tiny", dropout=0.0).eval()
    ids = torch.randint(0, 256, (1, 5))
    padded = torch.cat([ids, torch.full((1, 3), 256)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    torch.testing.assert_close(model(padded, mask).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    emb = model.embed(ids)
    assert emb.shape == (1, 64)
    out = model(ids, labels=torch.tensor([1]))
    assert out.logits.shape == (1, 2) and out.loss > 0


def test_bad_inputs():
    model = vf.create_model("transformer_tiny")
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, ids, attention_mask=torch.ones(5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids.*max_len=256"):
        model(torch.zeros(1, 300, dtype=torch.long), ids)
    with pytest.raises(ValueError, match="pos_embedding"):
        vf.create_model("transformer_tiny", pos_embedding="absolute")
    with pytest.raises(ValueError, match="init"):
        vf.create_model("transformer_tiny", init="kaiming")
    with pytest.raises(ValueError, match="top_k"):
        model.generate(ids, 3, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 3, do_sample=True, temperature=0)
    enc = vf.create_model("encoder_tiny")
    with pytest.raises(ValueError, match="labels"):
        enc(ids, labels=torch.zeros(2, 5, dtype=torch.long))
