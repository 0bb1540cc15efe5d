import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from visionformers.data import IMG_EXTENSIONS, ImageFolderDataset


def _png(path, value=128, size=(20, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


@pytest.fixture
def class_tree(tmp_path):
    _png(tmp_path / "cats" / "a.png", 0)
    _png(tmp_path / "cats" / "sub" / "b.png", 255)
    _png(tmp_path / "hot_dogs" / "c.png", 64, mode="L")
    (tmp_path / "empty_dir").mkdir()
    return tmp_path


def test_class_layout_labels_and_items(class_tree):
    ds = ImageFolderDataset(class_tree, resolution=8)
    assert ds.classes == ["cats", "hot_dogs"] and len(ds) == 3
    assert ds.labels == [0, 0, 1]
    item = ds[0]
    assert item["pixel_values"].shape == (3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert type(item["pixel_values"]) is torch.Tensor
    assert torch.allclose(item["pixel_values"], torch.full((3, 8, 8), -1.0))  # black -> -1
    assert torch.allclose(ds[1]["pixel_values"], torch.ones(3, 8, 8))  # white -> 1
    assert ds[2]["caption"] == "hot dogs"  # class name fallback


def test_flat_layout_is_unconditional_and_grayscale(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", 40 * i)
    (tmp_path / "notes.md").write_text("ignored")
    ds = ImageFolderDataset(tmp_path, resolution=6, channels=1, center_crop=False, random_flip=True)
    assert len(ds) == 3 and ds.classes == [] and ds.labels == [-1, -1, -1]
    item = ds[1]
    assert item["pixel_values"].shape == (1, 6, 6) and item["label"] == -1 and item["caption"] == ""
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 1, 6, 6) and batch["label"].tolist() == [-1, -1]


def test_captions_file_then_sidecar_then_class_name(class_tree):
    (class_tree / "caps.jsonl").write_text(json.dumps({"file_name": "cats/sub/b.png", "text": "a white cat"}) + "\n")
    (class_tree / "cats" / "a.txt").write_text("a black cat\n")
    ds = ImageFolderDataset(class_tree, resolution=8, captions_file=class_tree / "caps.jsonl")
    assert [ds[i]["caption"] for i in range(3)] == ["a black cat", "a white cat", "hot dogs"]


def test_broken_images_are_skipped_with_one_warning(tmp_path):
    for i in range(3):
        _png(tmp_path / f"ok{i}.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tmp_path, resolution=4)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "skipped 2" in msgs[0]
    assert len(ds) == 3 and ds.num_skipped == 2


def test_mixed_layout_warns_about_top_level_images(class_tree):
    _png(class_tree / "stray.png")
    with pytest.warns(UserWarning, match="ignored 1"):
        ds = ImageFolderDataset(class_tree, resolution=4)
    assert len(ds) == 3


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope", resolution=8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        ImageFolderDataset(tmp_path, resolution=8)
    assert str(tmp_path) in str(e.value) and ".png" in str(e.value) and len(IMG_EXTENSIONS) > 5


@pytest.mark.parametrize("kwargs,name", [({"resolution": 0}, "resolution"), ({"resolution": 8, "channels": 4}, "channels"),
                                         ({"resolution": 8, "check": "deep"}, "check")])
def test_bad_arguments(class_tree, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageFolderDataset(class_tree, **kwargs)


# ---- issue item 12: 16-bit PNGs, link loops, transparency, small images, captions that match nothing ----


def test_item12_sixteen_bit_png_is_scaled_not_white(tmp_path):
    arr = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)  # 16x16
    Image.fromarray(arr).save(tmp_path / "deep.png")  # uint16: mode I;16
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    ds = ImageFolderDataset(tmp_path, 16, channels=1, transform=lambda im: np.asarray(im))
    got = ds[0]["pixel_values"]
    assert got[0, 0] == 0 and got[0, 15] == 64 and got[15, 0] == 128 and got[15, 15] == 255


def test_item12_link_loops_are_followed_once(tmp_path):
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png", size=(16, 16))
        _png(tmp_path / "b" / f"{i}.png", size=(16, 16))
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "b" / "up").symlink_to(tmp_path, target_is_directory=True)
    ds = ImageFolderDataset(tmp_path, 16)
    assert len(ds) <= 12 and sorted(set(ds.paths)) == sorted(ds.paths)
    assert sum("/loop/" in p for p in ds.paths) == 0  # a/ itself is not walked twice


def test_item12_transparency_is_composited_and_small_images_counted_once(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # hidden red under alpha 0 on the left, opaque red on the right
    rgba[:, 8:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    _png(tmp_path / "tiny1.png", size=(4, 4))
    _png(tmp_path / "tiny2.png", size=(4, 20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(tmp_path, 16, transform=lambda im: np.asarray(im))
    text = " ".join(str(w.message) for w in caught)
    assert len(caught) == 1 and "1 image(s) have transparency" in text and "2 of 3 image(s) are smaller" in text
    pixels = ds[ds.paths.index(str(tmp_path / "clear.png"))]["pixel_values"]
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[0, 15]) == (200, 0, 0)


def test_item12_a_captions_file_matching_no_image_is_an_error(class_tree):
    captions = class_tree / "captions.jsonl"
    captions.write_text(json.dumps({"file_name": "dogs/x.png", "text": "a dog"}) + "\n")
    with pytest.raises(ValueError, match=r"none of its 1 file_name\(s\) \(e.g. 'dogs/x.png'\).*e.g. 'cats/a.png'"):
        ImageFolderDataset(class_tree, 8, captions_file=captions)
