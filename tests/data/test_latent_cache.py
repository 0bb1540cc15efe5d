"""The latent cache: encoded once, reused, rebuilt (with the reason) for another VAE or settings, corrupt and
partial shards re-encoded, flips cached as latents of their own, shards spread over processes."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

import visionformers as vf
from visionformers.data.latent_cache import build_latent_cache, posterior_sample
from visionformers.training import SeededItems

KEY = {"data": {"source": "test"}, "transform": {"resolution": 8}}


class Images(Dataset):
    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "label": int(self.labels[i])}


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return vf.create_model("vae_tiny", in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                           sample_size=8, scaling_factor=0.5, shift_factor=0.1).eval()


def build(tmp_path, vae=None, key=KEY, **kw):
    logs = []
    ds = build_latent_cache(tmp_path / "cache", vae or tiny_vae(), Images(), key, batch_size=4, shard_size=4,
                            log=logs.append, **kw)
    return ds, " | ".join(logs)


def shard_files(tmp_path):
    return sorted((tmp_path / "cache").glob("shard-*.safetensors"))


def test_items_hold_the_scaled_posterior_and_conditions(tmp_path):
    vae = tiny_vae()
    ds, log = build(tmp_path, vae)
    assert "10 encoded" in log and len(ds) == 10 and len(shard_files(tmp_path)) == 3
    with torch.no_grad():
        post = vae.encode(Images().x[7:8])
    item = ds[7]
    torch.testing.assert_close(item["latent_mean"], ((post.mean - 0.1) * 0.5)[0])
    torch.testing.assert_close(item["latent_std"], (post.std * 0.5)[0])
    assert item["label"] == 7 % 3 and "pixel_values" not in item
    batch = {"latent_mean": item["latent_mean"][None], "latent_std": item["latent_std"][None]}
    z1 = posterior_sample(batch, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(z1, posterior_sample(batch, torch.Generator().manual_seed(1), "cpu"))


def test_reused_then_rebuilt_for_another_vae_or_settings(tmp_path):
    build(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in shard_files(tmp_path)}
    _, log = build(tmp_path)
    assert "reused" in log and "rebuilding" not in log
    assert {p.name: p.stat().st_mtime_ns for p in shard_files(tmp_path)} == before
    _, log = build(tmp_path, vae=tiny_vae(seed=1))
    assert "rebuilding, it was built with another VAE" in log
    assert not set(before) & {p.name for p in shard_files(tmp_path)}  # the old key's shards are gone
    _, log = build(tmp_path, vae=tiny_vae(seed=1), key={**KEY, "transform": {"resolution": 8, "center_crop": False}})
    assert "rebuilding, it was built with other transform settings" in log
    _, log = build(tmp_path, vae=tiny_vae(seed=1), key={**KEY, "transform": {"resolution": 8, "center_crop": False}},
                   flips=True)
    assert "flips on/off" in log


@pytest.mark.parametrize("damage", ["corrupt", "partial", "missing"])
def test_damaged_shard_is_detected_and_encoded_again(tmp_path, damage):
    ds, _ = build(tmp_path)
    good = torch.stack([ds[i]["latent_mean"] for i in range(10)])
    shard = shard_files(tmp_path)[1]
    data = bytearray(shard.read_bytes())
    if damage == "corrupt":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "partial":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    ds, log = build(tmp_path)
    assert "shard 1 is" in log and ("checksum" in log if damage != "missing" else "missing" in log)
    assert "shard 0" not in log and "shard 2" not in log  # the others are kept
    assert torch.equal(torch.stack([ds[i]["latent_mean"] for i in range(10)]), good)
    _, log = build(tmp_path)
    assert "reused" in log


def test_flips_are_latents_of_their_own(tmp_path):
    vae = tiny_vae()
    ds, _ = build(tmp_path, vae, flips=True)
    with torch.no_grad():
        x = Images().x[3:4]
        plain, mirrored = vae.scale_latents(vae.encode(x).mean)[0], vae.scale_latents(vae.encode(x.flip(-1)).mean)[0]
    seen = set()
    items = SeededItems(ds, seed=0)
    for epoch in range(8):
        mean = items[(epoch, 3)]["latent_mean"]
        if torch.allclose(mean, plain, atol=1e-6):
            seen.add("plain")
        elif torch.allclose(mean, mirrored, atol=1e-6):
            seen.add("flipped")
        else:
            raise AssertionError("an item is neither the image's latent nor its mirror's")
    assert seen == {"plain", "flipped"}
    assert torch.equal(items[(0, 3)]["latent_mean"], items[(0, 3)]["latent_mean"])  # seeded per item


class _Stop(Exception):
    pass


def test_two_processes_share_the_shards(tmp_path):
    """Process k % 2 encodes shard k: rank 1 runs to its barrier (then stops), rank 0 does its shards and the
    manifest; the cache equals a one-process build, and rank 0 never encoded rank 1's shard."""
    single, _ = build(tmp_path / "one")

    def stop():
        raise _Stop

    with pytest.raises(_Stop):
        build_latent_cache(tmp_path / "two", tiny_vae(), Images(), KEY, rank=1, world=2, barrier=stop, batch_size=4,
                           shard_size=4, log=lambda m: None)
    logs = []
    ds = build_latent_cache(tmp_path / "two", tiny_vae(), Images(), KEY, rank=0, world=2, batch_size=4,
                            shard_size=4, log=logs.append)
    assert "(6 encoded here)" in logs[-1]  # shards 0 and 2: items 0-3 and 8-9
    assert all(torch.equal(ds[i]["latent_mean"], single[i]["latent_mean"]) for i in range(10))


def test_bad_inputs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        build_latent_cache(tmp_path / "file", tiny_vae(), Images(), KEY)
    with pytest.raises(ValueError, match="factor"):
        vae = vf.create_model("vae_tiny", in_channels=1, out_channels=1, norm_num_groups=4, block_out_channels=(8,) * 5)  # factor 16 > 8 px
        build_latent_cache(tmp_path / "c", vae, Images(), KEY)
