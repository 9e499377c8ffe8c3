"""Data: subset registry, wnid index, readers for every format, cache, bundled subset, errors."""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ld3m_fast.data import (
    ImageSet,
    SUBSET_NAMES,
    imagenet_class_names,
    imagenet_wnids,
    load_dataset,
    require_per_class,
    resolve_subset,
    subset_aliases,
)
from ld3m_fast.data import cache, decode, sources
from ld3m_fast.errors import LD3MError

from _data_helpers import CountingDecoder, logged_warnings


# ----------------------------------------------------------------------------- helpers

def _write_image(path: Path, size=(20, 20), colour=(200, 30, 60), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        image = Image.new("L", size, colour[0])
    elif mode == "RGBA":
        image = Image.new("RGBA", size, (*colour, 128))
    else:
        image = Image.new("RGB", size, colour)
    image.save(path, format=fmt)
    return path


def _imagenet_tree(root: Path, subset="imagenette", per_class=3, split="train"):
    """A tiny ImageNet tree holding the subset's wnid folders, solid colour per class."""
    for label, wnid in enumerate(resolve_subset(subset).wnids):
        for i in range(per_class):
            _write_image(root / split / wnid / f"{wnid}_{i}.JPEG", size=(17 + 5 * i, 23),
                         colour=(20 * label, 100, 255 - 20 * label), fmt="JPEG")
    return root


# ----------------------------------------------------------------------------- subsets

def test_wnid_index_order():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids[0] == "n01440764"
    assert wnids[217] == "n02102040"
    assert list(wnids) == sorted(wnids)  # ImageNet class index = sorted wnid order
    names = imagenet_class_names()
    assert names[0] == "tench" and names[217] == "English springer"


def test_subset_registry_and_aliases():
    assert len(SUBSET_NAMES) == 12
    for name in SUBSET_NAMES:
        subset = resolve_subset(name)
        size = 1000 if name == "imagenet-1k" else 10
        assert subset.name == name and subset.num_classes == size
        assert len(set(subset.imagenet_indices)) == size
        assert all(0 <= i < 1000 for i in subset.imagenet_indices)
    nette = resolve_subset("ImageNette")
    assert nette.imagenet_indices == (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)
    assert nette.wnids[:2] == ["n01440764", "n02102040"]
    assert nette.class_names[0] == "tench"
    expected = {"fruits": "imagefruit", "cats": "imagemeow", "birds": "imagesquawk",
                "yellow": "imageyellow", "a": "imagenet-a", "b": "imagenet-b", "c": "imagenet-c",
                "d": "imagenet-d", "e": "imagenet-e", "nette": "imagenette", "woof": "imagewoof"}
    for alias, canonical in expected.items():
        assert resolve_subset(alias).name == canonical
        assert subset_aliases()[alias] == canonical
    assert resolve_subset("imagenet_birds").name == "imagesquawk"
    assert resolve_subset("B").imagenet_indices[0] == 129
    assert resolve_subset("e").imagenet_indices == (816, 96, 100, 145, 739, 713, 783, 76, 688, 326)


def test_unknown_subset_lists_valid_names():
    with pytest.raises(LD3MError, match="unknown subset 'imagedog'.*imagenette.*imagenet-e"):
        resolve_subset("imagedog")


# ----------------------------------------------------------------------------- geometry

def test_shorter_side_resize_then_centre_crop(tmp_path):
    # 40x20: white band in the middle half of the width; after resize (20 -> 10 rows,
    # 40 -> 20 columns) the centre 10 columns are exactly that band.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 10:30] = 255
    path = tmp_path / "band.png"
    Image.fromarray(pixels).save(path)
    out = decode.decode_image_file(path, 10)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    assert out[:, :, 1:9].min() == 255  # interior of the band, away from the blended edges
    tall = np.ascontiguousarray(pixels.transpose(1, 0, 2))  # 20 wide, 40 tall
    Image.fromarray(tall).save(path)
    out = decode.decode_image_file(path, 10)
    assert out[:, 1:9, :].min() == 255


def test_grayscale_and_alpha_become_rgb(tmp_path):
    gray = decode.decode_image_file(_write_image(tmp_path / "g.png", (9, 13), (77,), "L"), 8)
    assert gray.shape == (3, 8, 8) and (gray == 77).all()
    rgba = decode.decode_image_file(_write_image(tmp_path / "a.png", (8, 8), (1, 2, 3), "RGBA"), 8)
    assert rgba.shape == (3, 8, 8) and rgba[:, 0, 0].tolist() == [1, 2, 3]


def test_array_batch_resize_matches_geometry():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    same = decode.resize_array_batch(images, 28)
    assert same.shape == (5, 3, 28, 28)
    assert torch.equal(same[:, 0], torch.from_numpy(images)) and torch.equal(same[:, 0], same[:, 2])
    up = decode.resize_array_batch(images, 32)
    assert up.shape == (5, 3, 32, 32) and up.dtype == torch.uint8
    wide = np.full((2, 10, 20, 3), 9, np.uint8)
    assert (decode.resize_array_batch(wide, 8) == 9).all()


# ----------------------------------------------------------------------------- ImageNet tree

def test_imagenet_tree_with_subset(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=2)
    data = load_dataset(root, subset="nette", res=16, cache_dir=tmp_path / "cache")
    assert data.images.shape == (20, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64
    assert data.class_counts() == [2] * 10
    assert data.class_names[0] == "tench" and data.class_names[1] == "English springer"
    # Label k is the k-th class of the subset: class 3's colour has red channel 60.
    centre = data.by_class(3)[:, :, 8, 8].float()
    assert torch.allclose(centre[:, 0], torch.full((2,), 60.0), atol=6)


def test_imagenet_val_split_and_whole_tree(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=1, split="val")
    val = load_dataset(root, split="val", subset="imagenette", res=8, cache_dir=tmp_path / "c")
    assert len(val) == 10
    # "test" falls back to the val folder (ImageNet's held-out split).
    test = load_dataset(root, split="test", res=8, cache_dir=tmp_path / "c")
    assert torch.equal(test.images, val.images)  # all wnid folders, in ImageNet index order
    with pytest.raises(LD3MError, match="no 'train' folder"):
        load_dataset(root, split="train", res=8, cache_dir=tmp_path / "c")


def test_missing_subset_class_folder(tmp_path):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=1)
    (root / "train" / "n02102040" / "n02102040_0.JPEG").unlink()
    (root / "train" / "n02102040").rmdir()
    with pytest.raises(LD3MError, match=r"n02102040 \(English springer\).*imagenette.*missing"):
        load_dataset(root, subset="imagenette", res=8, cache_dir=tmp_path / "c")


def test_unreadable_image_is_skipped_with_warning(tmp_path, caplog):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=2)
    (root / "train" / "n01440764" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        data = load_dataset(root, subset="imagenette", res=8, cache_dir=tmp_path / "c")
    (message,) = logged_warnings(caplog)
    assert re.search("skipped 1 unreadable image.*broken.JPEG", message), message
    assert data.class_counts() == [2] * 10


def test_class_with_only_unreadable_images_fails(tmp_path):
    root = tmp_path / "folder"
    _write_image(root / "good" / "a.png")
    (root / "bad").mkdir()
    (root / "bad" / "x.png").write_bytes(b"\x89PNG garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LD3MError, match="no readable images for class.*bad"):
            load_dataset(root, res=8, cache_dir=tmp_path / "c")


def test_flat_val_folder_is_explained(tmp_path):
    _imagenet_tree(tmp_path / "imagenet", per_class=1)
    _write_image(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    with pytest.raises(LD3MError, match="holds images directly.*subfolder"):
        load_dataset(tmp_path / "imagenet", split="val", res=8, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- ImageFolder

def test_image_folder_tree_mixed_formats(tmp_path):
    root = tmp_path / "pets"
    _write_image(root / "dogs" / "1.jpg", (31, 17), (250, 0, 0), fmt="JPEG")
    _write_image(root / "dogs" / "2.PNG", (12, 40), (250, 0, 0))
    _write_image(root / "cats" / "1.png", (9, 9), (90,), mode="L")
    (root / "cats" / "notes.txt").write_text("ignored: not an image extension")
    data = load_dataset(root, res=12, cache_dir=tmp_path / "c")
    assert data.class_names == ["cats", "dogs"]  # sorted subfolders
    assert data.labels.tolist() == [0, 1, 1]
    assert (data.by_class(0) == 90).all()  # grayscale replicated to 3 channels
    assert data.images.shape == (3, 3, 12, 12)
    with pytest.raises(LD3MError, match="--subset needs an ImageNet tree"):
        load_dataset(root, subset="imagenette", res=12, cache_dir=tmp_path / "c")
    with pytest.raises(LD3MError, match="no 'test/val/validation' folder"):
        load_dataset(root, split="test", res=12, cache_dir=tmp_path / "c")


def test_image_folder_with_split_folders_and_max_per_class(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("x", "y"):
            for i in range(n):
                _write_image(root / split / cls / f"{i}.png", (10, 10), (i * 40, 0, 0))
    train = load_dataset(root, res=10, max_per_class=3, cache_dir=tmp_path / "c")
    assert train.class_counts() == [3, 3]
    # The first files in sorted order are kept.
    assert train.by_class(0)[:, 0, 5, 5].tolist() == [0, 40, 80]
    test = load_dataset(root, split="test", res=10, cache_dir=tmp_path / "c")
    assert test.class_counts() == [2, 2]


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_folder(root: Path, per_batch=6):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[0, :1024] = 255  # image 0: red plane saturated
        data[0, 1024:] = 0
        labels = [i % 10 for i in range(per_batch)]
        with open(root / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, handle)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, handle)
    return root


def test_cifar10_batches(tmp_path):
    # The batches are user-supplied pickles; they are read with an unpickler that only
    # admits numpy array reconstruction.
    folder = _cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=10)
    train = load_dataset(tmp_path, res=32, cache_dir=tmp_path / "c")  # parent works
    assert train.images.shape == (50, 3, 32, 32)
    assert train.class_names[9] == "truck" and train.class_counts() == [5] * 10
    assert (train.images[0, 0] == 255).all() and (train.images[0, 1:] == 0).all()
    test = load_dataset(folder, split="test", res=16, cache_dir=tmp_path / "c")
    assert test.images.shape == (10, 3, 16, 16)
    with pytest.raises(LD3MError, match="--subset applies to ImageNet"):
        load_dataset(folder, subset="a", res=32, cache_dir=tmp_path / "c")


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    folder = _cifar_folder(tmp_path / "cifar", per_batch=10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(LD3MError, match="refusing to load"):
        load_dataset(folder, split="test", res=32, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- IDX

def _write_idx(path: Path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path, gz):
    folder = tmp_path / "mnist"
    folder.mkdir()
    suffix = ".gz" if gz else ""
    images = np.random.default_rng(1).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    _write_idx(folder / f"train-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    data = load_dataset(folder, res=28, cache_dir=tmp_path / "c")
    assert data.images.shape == (20, 3, 28, 28)
    # Grouped by class, each class in file order.
    order = np.argsort(labels, kind="stable")
    assert torch.equal(data.images[:, 1], torch.from_numpy(images[order]))
    assert data.labels.tolist() == labels[order].tolist()
    assert data.class_names[0] == "0"
    with pytest.raises(LD3MError, match="no test IDX files"):
        load_dataset(folder, split="test", res=28, cache_dir=tmp_path / "c")


def test_truncated_idx_is_an_error(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), False)
    _write_idx(folder / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), False)
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(LD3MError, match="truncated or corrupt"):
        load_dataset(folder, res=28, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_bundled_fashion_mnist_subset(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with caplog.at_level(logging.INFO, logger="ld3m_fast.data"):
        train = load_dataset("fashion-mnist", res=28, cache_dir=tmp_path / "c")
    assert any("bundled subset" in m for m in caplog.messages)
    assert train.images.shape == (3000, 3, 28, 28) and train.class_counts() == [300] * 10
    assert train.class_names[9] == "Ankle boot"
    test = load_dataset("fashion-mnist", split="test", res=32, cache_dir=tmp_path / "c")
    assert test.images.shape == (1000, 3, 32, 32) and test.class_counts() == [100] * 10


@pytest.mark.skipif(not (sources.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ld3m_fast.data"):
        test = load_dataset("fashion-mnist", split="test", res=28, cache_dir=tmp_path / "c")
    assert any("full Fashion-MNIST" in m for m in caplog.messages)
    assert test.images.shape == (10000, 3, 28, 28) and test.class_counts() == [1000] * 10


# ----------------------------------------------------------------------------- cache

def test_cache_hit_equals_first_load_without_decoding(tmp_path, monkeypatch):
    root = _imagenet_tree(tmp_path / "imagenet", per_class=2)
    counter = CountingDecoder(monkeypatch)
    cache = tmp_path / "cache"
    first = load_dataset(root, subset="imagenette", res=16, cache_dir=cache)
    assert counter.calls == 20
    second = load_dataset(root, subset="imagenette", res=16, cache_dir=cache)
    assert counter.calls == 20  # served from the cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names
    (entry,) = cache.iterdir()
    # One entry: the rows, their index and the writers' lock; no partial or temporary file left.
    assert sorted(p.name for p in entry.iterdir()) == [".lock", "images.u8", "index.json"]
    # A different key (res, max_per_class) or a changed folder decodes again.
    load_dataset(root, subset="imagenette", res=8, cache_dir=cache)
    assert counter.calls == 40
    load_dataset(root, subset="imagenette", res=16, max_per_class=1, cache_dir=cache)
    assert counter.calls == 50
    _write_image(root / "train" / "n01440764" / "extra.JPEG", fmt="JPEG")
    grown = load_dataset(root, subset="imagenette", res=16, cache_dir=cache)
    assert counter.calls == 71 and len(grown) == 21


def test_corrupt_cache_file_is_rebuilt(tmp_path, caplog):
    root = tmp_path / "f"
    _write_image(root / "a" / "1.png")
    cache_dir = tmp_path / "cache"
    first = load_dataset(root, res=8, cache_dir=cache_dir)
    (entry,) = cache_dir.iterdir()
    (entry / "index.json").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        again = load_dataset(root, res=8, cache_dir=cache_dir)
    assert any("unreadable data cache" in m for m in logged_warnings(caplog))
    assert torch.equal(first.images, again.images)


# ----------------------------------------------------------------------------- errors, ImageSet

def test_missing_folder_and_bad_arguments(tmp_path):
    with pytest.raises(LD3MError, match="does-not-exist does not exist"):
        load_dataset(tmp_path / "does-not-exist", res=32, cache_dir=tmp_path / "c")
    with pytest.raises(LD3MError, match="unknown split"):
        load_dataset("fashion-mnist", split="holdout", res=32)
    with pytest.raises(LD3MError, match="unknown subset"):
        _imagenet_tree(tmp_path / "inet", per_class=1)
        load_dataset(tmp_path / "inet", subset="nope", res=8, cache_dir=tmp_path / "c")


def _toy_set(counts=(3, 5, 4)) -> ImageSet:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    return ImageSet(images.clone(), labels, ["a", "b", "c"])


def test_imageset_helpers_and_require_per_class():
    data = _toy_set()
    assert data.num_classes == 3 and len(data) == 12
    assert data.by_class(1)[:, 0, 0, 0].tolist() == [3, 4, 5, 6, 7]
    global_state = torch.get_rng_state()
    picked = data.sample_per_class(3, torch.Generator().manual_seed(5))
    again = data.sample_per_class(3, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(picked.images, again.images)
    assert picked.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for k in range(3):
        values = picked.by_class(k)[:, 0, 0, 0].tolist()
        assert len(set(values)) == 3 and set(values) <= set(data.by_class(k)[:, 0, 0, 0].tolist())
    require_per_class(data, 3)
    with pytest.raises(LD3MError, match=r"at least 4 images per class.*a \(3\)"):
        require_per_class(data, 4)
    with pytest.raises(LD3MError, match="b \\(5\\), c \\(4\\)"):
        data.sample_per_class(6, torch.Generator())
