import pytest
import torch

import visionformers as vf
from visionformers.nn import KVCache
from visionformers.text import T5Encoder


def spice(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, std)


@pytest.fixture
def t5():
    model = vf.create_model("t5_tiny", dropout=0.0).eval()
    spice(model)
    return model


def greedy_without_cache(model, ids, mask, steps):
    dec = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
    for _ in range(steps):
        nxt = model(ids, dec, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
        dec = torch.cat([dec, nxt], dim=1)
    return dec


def test_cached_generation_equals_recomputation(t5):
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    expected = greedy_without_cache(t5, ids, mask, 10)
    eos = next(i for i in range(261) if not (expected == i).any())  # an eos never emitted: all 10 steps run
    assert torch.equal(t5.generate(ids, 10, attention_mask=mask, eos_token_id=eos), expected)
    assert len(set(expected[0, 1:].tolist())) > 1


def test_padding_mask_hides_padded_source_tokens(t5):
    ids = torch.randint(0, 256, (1, 6))
    padded = torch.cat([ids, torch.randint(0, 256, (1, 3))], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    dec = torch.randint(0, 256, (1, 4))
    torch.testing.assert_close(t5(padded, dec, attention_mask=mask), t5(ids, dec), atol=1e-5, rtol=1e-5)


def test_decoder_is_causal(t5):
    ids, dec = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 6))
    changed = dec.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % 256
    torch.testing.assert_close(t5(ids, dec)[:, :4], t5(ids, changed)[:, :4])


def test_relative_bias_shared_and_unscaled(t5):
    blocks = t5.encoder.blocks
    assert all(b.attn.scale == 1.0 for b in blocks)
    assert sum(1 for n, _ in t5.named_parameters() if "rel_bias" in n) == 2  # one table per stack


def test_encoder_model_matches_full_encoder(t5):
    enc = T5Encoder(t5.config).eval()
    state = {k: v for k, v in t5.state_dict().items() if not k.startswith("decoder.")}
    enc.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(enc(ids), t5.encode(ids))


def test_untied_head():
    model = vf.create_model("t5_tiny", tie_embeddings=False, mlp_act="geglu_tanh")
    ids = torch.randint(0, 256, (1, 4))
    assert model(ids, ids).shape == (1, 4, 261)
    assert model.lm_head is not None and model.encoder.blocks[0].mlp.gated
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # a separate matrix
    tied = vf.create_model("t5_tiny", mlp_act="geglu_tanh")
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("lm_head")})
    assert not torch.allclose(tied(ids, ids), model(ids, ids))  # the untied head is the one used


def test_bad_inputs(t5):
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        t5(ids, ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        t5(ids, torch.full((2, 3), 999))
    with pytest.raises(ValueError, match="input_ids"):
        t5.generate(torch.full((1, 3), -2), 4)
    with pytest.raises(ValueError, match="top_p"):
        t5.generate(ids, 4, do_sample=True, top_p=0.0)


def test_cached_decoding_matches_full_forward(t5):
    ids, dec = torch.randint(0, 256, (2, 7)), torch.randint(0, 256, (2, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 4:] = False
    full = t5(ids, dec, attention_mask=mask)
    memory = t5.encode(ids, mask)
    caches, cross = [KVCache(max_len=6) for _ in range(2)], [KVCache() for _ in range(2)]
    steps = [t5.decode(dec[:, :2], memory, mask, caches, cross)]
    steps += [t5.decode(dec[:, t : t + 1], memory, mask, caches, cross) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
