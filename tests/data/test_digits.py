import gzip

import numpy as np
import pytest
import torch

from visionformers.data import DIGIT_NAMES, DigitsDataset, load_digits
from visionformers.data.digits import (
    DIGITS_PATH, NUM_IMAGES, NUM_TEST, NUM_TRAIN, find_digits_file, read_digits_file, split_indices,
)


def test_file_contents_match_the_uci_description():
    pixels, labels = read_digits_file()
    assert pixels.shape == (NUM_IMAGES, 8, 8) and labels.shape == (NUM_IMAGES,)
    assert pixels.min() == 0 and pixels.max() == 16
    assert sorted(np.unique(labels)) == list(range(10))
    # row-major order: the first 8 csv values are the top image row
    with gzip.open(DIGITS_PATH, "rt") as f:
        first = [int(v) for v in f.readline().split(",")]
    assert pixels[0, 0].tolist() == first[:8] and labels[0] == first[-1]


def test_digits_file_is_found_in_a_checkout_and_in_a_wheel_install(tmp_path):
    """A source checkout reads assets/digits; a wheel install (no checkout around the package) reads the copy
    pyproject's data-files put under <prefix>/share/visionformers/digits."""
    package_dir = tmp_path / "site-packages" / "visionformers" / "data"
    package_dir.mkdir(parents=True)
    installed = tmp_path / "prefix" / "share" / "visionformers" / "digits" / "digits.csv.gz"
    checkout = tmp_path / "site-packages" / "assets" / "digits" / "digits.csv.gz"  # <package_dir>/../../assets
    assert find_digits_file(package_dir, str(tmp_path / "prefix")) == checkout  # neither: the checkout path
    installed.parent.mkdir(parents=True)
    installed.write_bytes(DIGITS_PATH.read_bytes())
    assert find_digits_file(package_dir, str(tmp_path / "prefix")) == installed
    checkout.parent.mkdir(parents=True)
    checkout.write_bytes(b"")
    assert find_digits_file(package_dir, str(tmp_path / "prefix")) == checkout
    assert read_digits_file(installed)[0].shape == (NUM_IMAGES, 8, 8)


def test_split_is_fixed_disjoint_stratified_and_complete():
    _, labels = read_digits_file()
    train, test = split_indices(labels, "train"), split_indices(labels, "test")
    assert (len(train), len(test)) == (NUM_TRAIN, NUM_TEST) == (1433, 364)
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(NUM_IMAGES))
    for c in range(10):  # every class split 4:1 (ceil for test)
        n = (labels == c).sum()
        assert (labels[test] == c).sum() == -(-n // 5)
    assert np.array_equal(split_indices(labels, "all"), np.arange(NUM_IMAGES))


@pytest.mark.parametrize("image_size,channels", [(8, 1), (32, 1), (28, 3)])
def test_items_shape_range_dtype(image_size, channels):
    ds = DigitsDataset("test", image_size=image_size, channels=channels)
    item = ds[5]
    x = item["pixel_values"]
    assert x.shape == (channels, image_size, image_size) and x.dtype == torch.float32
    assert isinstance(item["label"], int) and isinstance(item["caption"], str)
    imgs = ds.images
    assert imgs.shape == (NUM_TEST, channels, image_size, image_size)
    assert imgs.min() >= -1 and imgs.max() <= 1 and imgs.min() == -1  # background is 0 -> -1
    assert torch.equal(imgs[5], x)


def test_native_size_is_the_raw_data_rescaled():
    pixels, labels = read_digits_file()
    ds = DigitsDataset("all", image_size=8)
    assert torch.allclose(ds.images[:, 0], torch.from_numpy(pixels).float() / 16 * 2 - 1)
    assert torch.equal(ds.labels, torch.from_numpy(labels))


def test_resize_preserves_mean_intensity():
    # bilinear upsampling by an integer factor keeps the mean closely (edges aside): a cheap sanity check
    small, _ = load_digits(8)
    big, _ = load_digits(32)
    assert torch.allclose(small.mean(dim=(1, 2, 3)), big.mean(dim=(1, 2, 3)), atol=0.02)


def test_caption_names_the_label_and_is_deterministic():
    ds = DigitsDataset("train")
    for i in range(0, 40, 3):
        item = ds[i]
        cap = item["caption"]
        assert DIGIT_NAMES[item["label"]] in cap or str(item["label"]) in cap
        assert ds[i]["caption"] == cap
    assert len({ds[i]["caption"].replace(DIGIT_NAMES[ds[i]["label"]], "#") for i in range(16)}) > 4


def test_random_captions_and_flips_follow_the_generator():
    def draw(seed):
        ds = DigitsDataset("train", random_flip=True, random_captions=True, generator=torch.Generator().manual_seed(seed))
        return [ds[0] for _ in range(12)]

    a, b = draw(1), draw(1)
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    plain = DigitsDataset("train")[0]["pixel_values"]
    flips = [torch.equal(x["pixel_values"], plain.flip(-1)) for x in a]
    assert any(flips) and not all(flips)
    assert len({x["caption"] for x in a}) > 1


def test_captions_off_and_transform_hook():
    ds = DigitsDataset("test", captions=False, transform=lambda x: x.sum(dim=0))
    item = ds[0]
    assert "caption" not in item
    assert item["pixel_values"].min() >= 0  # the transform saw the [0, 1] image


def test_resized_tensor_is_cached():
    a, _ = load_digits(24)
    b, _ = load_digits(24)
    assert a is b


@pytest.mark.parametrize(
    "kwargs,name",
    [({"split": "val"}, "split"), ({"image_size": 0}, "image_size"), ({"image_size": 32.0}, "image_size"),
     ({"channels": 2}, "channels"), ({"interpolation": "area"}, "interpolation")],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name) as e:
        DigitsDataset(**kwargs)
    assert "expected" in str(e.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        DigitsDataset(data_path=tmp_path / "nothere.csv.gz")
