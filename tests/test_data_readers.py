"""Readers for ImageNet's flat val folder, CIFAR-100 and Tiny-ImageNet, and the `imagenet-1k` subset.

Every test writes small files in the real layout: the devkit's ground-truth list and its
`meta.mat` (a MAT 5 struct array `synsets`, written here from the format's specification,
compressed and not), Kaggle's `LOC_val_solution.csv` three folders above
`ILSVRC/Data/CLS-LOC/val`, `cifar-100-python/{train,test,meta}` pickles, and
`tiny-imagenet-200/` with `wnids.txt`, `words.txt`, `train/<wnid>/images`,
`val/images` + `val/val_annotations.txt`.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ld3m_fast.data import imagenet_class_names, imagenet_wnids, load_dataset, resolve_subset
from ld3m_fast.data.matfile import read_mat
from ld3m_fast.errors import LD3MError


def _image(path: Path, colour, size=(10, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _colour(k: int) -> tuple[int, int, int]:
    return (23 * k % 256, 100, 255 - 23 * k % 256)


def _centre(data, k) -> list[list[int]]:
    """The centre pixel of every image of class k."""
    return data.by_class(k)[:, :, 4, 4].tolist()


# ----------------------------------------------------------------------------- MAT 5 writer

MI_INT8, MI_UINT8, MI_UINT16, MI_INT32, MI_UINT32, MI_DOUBLE, MI_MATRIX, MI_COMPRESSED = 1, 2, 4, 5, 6, 9, 14, 15
MX_STRUCT, MX_CHAR, MX_DOUBLE = 2, 4, 6


def _element(kind: int, payload: bytes, endian: str) -> bytes:
    if len(payload) <= 4 and kind != MI_MATRIX:  # small data element
        tag = struct.pack(endian + "I", (len(payload) << 16) | kind)
        return tag + payload.ljust(4, b"\0")
    return struct.pack(endian + "II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _array(mx_class: int, dims, data: bytes, endian: str, name: bytes = b"") -> bytes:
    flags = _element(MI_UINT32, struct.pack(endian + "II", mx_class, 0), endian)
    shape = _element(MI_INT32, struct.pack(endian + f"{len(dims)}i", *dims), endian)
    return _element(MI_MATRIX, flags + shape + _element(MI_INT8, name, endian) + data, endian)


def _double(value, endian: str, as_uint16=False) -> bytes:
    if value is None:
        return _array(MX_DOUBLE, (0, 0), _element(MI_DOUBLE, b"", endian), endian)
    if as_uint16:  # MATLAB stores integer-valued doubles in the smallest integer type
        return _array(MX_DOUBLE, (1, 1), _element(MI_UINT16, struct.pack(endian + "H", value), endian), endian)
    return _array(MX_DOUBLE, (1, 1), _element(MI_DOUBLE, struct.pack(endian + "d", value), endian), endian)


def _chars(text: str, endian: str) -> bytes:
    utf16 = "utf-16-le" if endian == "<" else "utf-16-be"
    return _array(MX_CHAR, (1, len(text)), _element(MI_UINT16, text.encode(utf16), endian), endian)


def write_meta_mat(path: Path, synsets: list[tuple[int, str, str]], *, compressed=True, endian="<"):
    """`synsets`: (ILSVRC2012_ID, WNID, words) per struct element, as the devkit's meta.mat."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "num_children", "children"]
    body = _element(MI_INT32, struct.pack(endian + "i", 32), endian)
    body += _element(MI_INT8, b"".join(f.encode().ljust(32, b"\0") for f in fields), endian)
    for i, (ilsvrc_id, wnid, words) in enumerate(synsets):
        leaf = ilsvrc_id <= 1000
        body += (_double(ilsvrc_id, endian, as_uint16=i % 2 == 0) + _chars(wnid, endian) + _chars(words, endian)
                 + _double(0 if leaf else 1, endian) + _double(None if leaf else 1.0, endian))
    flags = _element(MI_UINT32, struct.pack(endian + "II", MX_STRUCT, 0), endian)
    shape = _element(MI_INT32, struct.pack(endian + "2i", len(synsets), 1), endian)
    matrix = _element(MI_MATRIX, flags + shape + _element(MI_INT8, b"synsets", endian) + body, endian)
    if compressed:
        packed = zlib.compress(matrix)
        matrix = struct.pack(endian + "II", MI_COMPRESSED, len(packed)) + packed
    header = b"MATLAB 5.0 MAT-file, written by the ld3m-fast tests".ljust(116) + b"\0" * 8
    header += struct.pack(endian + "H", 0x0100) + (b"IM" if endian == "<" else b"MI")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + matrix)


@pytest.mark.parametrize("compressed,endian", [(True, "<"), (False, "<"), (False, ">")])
def test_mat_reader_reads_struct_arrays(tmp_path, compressed, endian):
    synsets = [(7, "n02119789", "kit fox, Vulpes macrotis"), (1001, "n00001740", "entity"), (3, "n01440764", "tench")]
    write_meta_mat(tmp_path / "meta.mat", synsets, compressed=compressed, endian=endian)
    table = read_mat(tmp_path / "meta.mat")["synsets"]
    assert [int(s["ILSVRC2012_ID"][0, 0]) for s in table] == [7, 1001, 3]
    assert [s["WNID"] for s in table] == ["n02119789", "n00001740", "n01440764"]
    assert table[0]["words"] == "kit fox, Vulpes macrotis"
    assert table[0]["children"].shape == (0, 0) and table[1]["children"].tolist() == [[1.0]]


def test_mat_reader_refuses_other_files(tmp_path):
    (tmp_path / "short.mat").write_bytes(b"MATLAB")
    (tmp_path / "hdf5.mat").write_bytes(b"MATLAB 7.3 MAT-file".ljust(124) + b"\x00\x02IM")
    write_meta_mat(tmp_path / "cut.mat", [(1, "n01440764", "tench")], compressed=False)
    (tmp_path / "cut.mat").write_bytes((tmp_path / "cut.mat").read_bytes()[:-20])
    for name, message in (("short.mat", "shorter than"), ("hdf5.mat", "v7.3"), ("cut.mat", "past the end")):
        with pytest.raises(ValueError, match=message):
            read_mat(tmp_path / name)


def test_mat_reader_damage_is_a_value_error(tmp_path):
    """Every truncation and random byte changes of a meta.mat: read, or ValueError, nothing else."""
    write_meta_mat(tmp_path / "meta.mat", [(7, "n02119789", "kit fox"), (1001, "n00001740", "entity")],
                   compressed=False)
    raw = (tmp_path / "meta.mat").read_bytes()
    rng = np.random.default_rng(0)
    damaged = [raw[:n] for n in range(len(raw))]
    for _ in range(500):
        changed = bytearray(raw)
        for position in rng.integers(128, len(raw), 3):
            changed[position] = int(rng.integers(256))
        damaged.append(bytes(changed))
    for content in damaged:
        (tmp_path / "damaged.mat").write_bytes(content)
        try:
            read_mat(tmp_path / "damaged.mat")
        except ValueError:
            pass


def test_mat_reader_agrees_with_scipy(tmp_path):
    """Where scipy is installed: a meta.mat that scipy writes reads the same."""
    scipy_io = pytest.importorskip("scipy.io")
    records = np.zeros((3, 1), dtype=[("ILSVRC2012_ID", object), ("WNID", object), ("children", object)])
    for i, (k, wnid) in enumerate([(490, "n01751748"), (1, "n02119789"), (1200, "n00001740")]):
        records[i, 0] = (np.array([[k]], dtype=float), wnid, np.zeros((0, 0)))
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": records}, do_compression=True)
    table = read_mat(tmp_path / "meta.mat")["synsets"]
    assert [(int(s["ILSVRC2012_ID"][0, 0]), s["WNID"]) for s in table] == [
        (490, "n01751748"), (1, "n02119789"), (1200, "n00001740")]
    write_meta_mat(tmp_path / "ours.mat", [(5, "n01440764", "tench")])
    ours = scipy_io.loadmat(tmp_path / "ours.mat", squeeze_me=True)["synsets"]
    assert int(ours["ILSVRC2012_ID"]) == 5 and str(ours["WNID"]) == "n01440764"


# ----------------------------------------------------------------------------- ImageNet's flat val/

# Devkit ids are not the sorted-wnid order: id 1 is kit fox (ImageNet index 278), and so on.
VAL_CLASSES = [(1, 278), (2, 212), (3, 250), (4, 193), (5, 217)]  # (ILSVRC2012_ID, ImageNet index)
VAL_LABELS = [3, 1, 5, 1, 2, 4, 3, 5, 1, 2, 4, 3]  # devkit id of val images 1..12


def _flat_val(root: Path) -> Path:
    wnids = imagenet_wnids()
    index_of_id = dict(VAL_CLASSES)
    for number, ilsvrc_id in enumerate(VAL_LABELS, start=1):
        _image(root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", _colour(index_of_id[ilsvrc_id]), fmt="JPEG")
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{k}\n" for k in VAL_LABELS))
    synsets = [(k, wnids[index], imagenet_class_names()[index]) for k, index in VAL_CLASSES]
    write_meta_mat(devkit / "meta.mat", synsets + [(1001, "n00001740", "entity")])
    return root


def _expected_by_index(labels_by_image: list[int]) -> dict[int, list[int]]:
    """ImageNet index -> the val image numbers of that class, in file order."""
    index_of_id = dict(VAL_CLASSES)
    groups: dict[int, list[int]] = {}
    for number, ilsvrc_id in enumerate(labels_by_image, start=1):
        groups.setdefault(index_of_id[ilsvrc_id], []).append(number)
    return groups


def test_flat_val_with_devkit_ground_truth(tmp_path):
    root = _flat_val(tmp_path / "imagenet")
    data = load_dataset(root, split="val", res=8, cache_dir=tmp_path / "c")
    groups = _expected_by_index(VAL_LABELS)
    indices = sorted(groups)  # classes in ImageNet index order: 193, 212, 217, 250, 278
    assert data.class_names == [imagenet_class_names()[i] for i in indices]
    assert data.class_counts() == [len(groups[i]) for i in indices]
    for k, index in enumerate(indices):
        for centre in _centre(data, k):
            assert np.allclose(centre, _colour(index), atol=8), (index, centre)
    # "test" is ImageNet's val too; a subset keeps its own label order.
    with pytest.raises(LD3MError, match=r"no images of class n01440764 \(tench\) of subset imagenette"):
        load_dataset(root, split="test", subset="imagenette", res=8, cache_dir=tmp_path / "c")


def test_flat_val_with_a_subset(tmp_path):
    """ImageNette's val images in the flat folder, labelled through the ground truth."""
    nette = resolve_subset("imagenette")
    wnids = imagenet_wnids()
    ids = [(k + 1, index) for k, index in enumerate(reversed(nette.imagenet_indices))]  # ids not in label order
    index_of_id = dict(ids)
    labels = [1 + (i * 7) % 10 for i in range(20)] + [1]
    root = tmp_path / "imagenet"
    for number, ilsvrc_id in enumerate(labels, start=1):
        _image(root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", _colour(index_of_id[ilsvrc_id]), fmt="JPEG")
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, labels)))
    write_meta_mat(root / "meta.mat", [(k, wnids[i], "") for k, i in ids], compressed=False)
    data = load_dataset(root, split="val", subset="nette", res=8, cache_dir=tmp_path / "c")
    assert data.class_names == nette.class_names
    assert data.class_counts() == [2] * 9 + [3]  # id 1 (three images) is ImageNette's last class
    for k, index in enumerate(nette.imagenet_indices):
        assert all(np.allclose(c, _colour(index), atol=8) for c in _centre(data, k))


def test_flat_val_ground_truth_without_meta_mat_is_one_error(tmp_path):
    root = _flat_val(tmp_path / "imagenet")
    (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(LD3MError, match=r"ILSVRC2012_validation_ground_truth.txt gives devkit class ids.*"
                                        r"put ILSVRC2012_devkit_t12/data/meta.mat beside it") as caught:
        load_dataset(root, split="val", res=8, cache_dir=tmp_path / "c")
    assert "\n" not in str(caught.value)


def test_flat_val_with_damaged_label_files(tmp_path):
    root = _flat_val(tmp_path / "imagenet")
    devkit = root / "ILSVRC2012_devkit_t12" / "data"
    (devkit / "meta.mat").write_bytes(b"MATLAB 5.0 but nothing else")
    with pytest.raises(LD3MError, match="cannot read the devkit's .*meta.mat: shorter than a MAT-file header"):
        load_dataset(root, split="val", res=8, cache_dir=tmp_path / "c")
    (devkit / "meta.mat").unlink()
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("3\nthree\n")
    write_meta_mat(devkit / "meta.mat", [(3, "n01440764", "tench")])
    with pytest.raises(LD3MError, match="cannot read .*ground_truth.txt: invalid literal"):
        load_dataset(root, split="val", res=8, cache_dir=tmp_path / "c")


def _kaggle(root: Path, labels: list[int]) -> Path:
    """Kaggle's layout: ILSVRC/Data/CLS-LOC/val/*.JPEG and LOC_val_solution.csv at the top."""
    wnids = imagenet_wnids()
    val = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    rows = ["ImageId,PredictionString"]
    for number, index in enumerate(labels, start=1):
        image_id = f"ILSVRC2012_val_{number:08d}"
        _image(val / f"{image_id}.JPEG", _colour(index), fmt="JPEG")
        rows.append(f"{image_id},{wnids[index]} 12 30 200 180 {wnids[index]} 1 2 3 4 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows[:1] + rows[1:][::-1]) + "\n")  # any row order
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} x\n" for w in wnids))
    return root / "ILSVRC" / "Data" / "CLS-LOC"


def test_flat_val_with_kaggle_solution_csv(tmp_path, caplog):
    labels = [482, 0, 217, 0, 482, 217, 0]
    data_root = _kaggle(tmp_path / "kaggle", labels)
    _image(data_root / "val" / "stray.JPEG", (0, 0, 0), fmt="JPEG")  # not in the CSV
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        data = load_dataset(data_root, split="val", res=8, cache_dir=tmp_path / "c")
    assert [r.getMessage() for r in caplog.records if "no label" in r.getMessage()] == [
        f"1 image file(s) in {data_root / 'val'} have no label in {tmp_path / 'kaggle' / 'LOC_val_solution.csv'} "
        "and are left out (e.g. stray.JPEG)"]
    assert data.class_names == [imagenet_class_names()[i] for i in (0, 217, 482)]
    assert data.class_counts() == [3, 2, 2]
    for k, index in enumerate((0, 217, 482)):
        assert all(np.allclose(c, _colour(index), atol=8) for c in _centre(data, k))


def test_flat_val_without_labels_names_the_files_it_needs(tmp_path):
    _image(tmp_path / "imagenet" / "train" / "n01440764" / "a.JPEG", (1, 2, 3), fmt="JPEG")
    _image(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3), fmt="JPEG")
    with pytest.raises(LD3MError, match="holds images directly.*ILSVRC2012_validation_ground_truth.txt and "
                                        "meta.mat, or Kaggle's LOC_val_solution.csv"):
        load_dataset(tmp_path / "imagenet", split="val", res=8, cache_dir=tmp_path / "c")


def test_kaggle_csv_with_a_bad_row_is_one_error(tmp_path):
    data_root = _kaggle(tmp_path / "kaggle", [0, 1])
    csv = tmp_path / "kaggle" / "LOC_val_solution.csv"
    csv.write_text(csv.read_text() + "ILSVRC2012_val_00000003,12 30 200 180\n")
    with pytest.raises(LD3MError, match="cannot read .*LOC_val_solution.csv: line 4 has no wnid first"):
        load_dataset(data_root, split="val", res=8, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- CIFAR-100

def _cifar100(root: Path, per_split=(300, 100)) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in zip(("train", "test"), per_split):
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        fine = [(7 * i) % 100 for i in range(count)]
        data[:, :1024] = np.asarray(fine, dtype=np.uint8)[:, None]  # red plane = the fine label
        batch = {b"filenames": [f"img_{i}.png".encode() for i in range(count)], b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": data}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    meta = {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
            b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]}
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle)
    return folder


def test_cifar100_fine_labels(tmp_path):
    folder = _cifar100(tmp_path)
    train = load_dataset(tmp_path, res=32, cache_dir=tmp_path / "c")  # the parent works
    assert train.num_classes == 100 and train.class_names[:2] == ["fine0", "fine1"]
    assert train.class_counts() == [3] * 100 and len(train) == 300
    for k in (0, 42, 99):
        assert (train.by_class(k)[:, 0] == k).all()  # the red plane holds the fine label
    test = load_dataset(folder, split="test", res=16, max_per_class=1, cache_dir=tmp_path / "c")
    assert test.images.shape == (100, 3, 16, 16) and test.labels.tolist() == list(range(100))
    with pytest.raises(LD3MError, match="--subset applies to ImageNet folder trees, not to CIFAR-100"):
        load_dataset(folder, subset="nette", res=32, cache_dir=tmp_path / "c")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_cifar100_bad_pickles_are_one_error(tmp_path):
    folder = _cifar100(tmp_path / "a", per_split=(100, 100))
    with open(folder / "test", "wb") as handle:
        pickle.dump({b"data": _RunsCode(), b"fine_labels": []}, handle)
    with pytest.raises(LD3MError, match="cannot read CIFAR-100 file .*refusing to load"):
        load_dataset(folder, split="test", res=32, cache_dir=tmp_path / "c")
    with open(folder / "test", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 1]}, handle)
    with pytest.raises(LD3MError, match="no 'data' and 'fine_labels' entries.*cifar-100-python.tar.gz"):
        load_dataset(folder, split="test", res=32, cache_dir=tmp_path / "c")
    with open(folder / "meta", "wb") as handle:
        pickle.dump({b"fine_label_names": [b"only", b"two"]}, handle)
    with pytest.raises(LD3MError, match="'fine_label_names' must list the 100 classes, got 2"):
        load_dataset(folder, res=32, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = ["n02124075", "n01443537", "n04067472"]  # wnids.txt's own order, not sorted


def _tiny(root: Path, per_class=3, val_per_class=2) -> Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("n00001740\tentity\nn02124075\tEgyptian cat\n"
                                      "n01443537\tgoldfish, Carassius auratus\nn04067472\treel\n")
    order = sorted(TINY_WNIDS)
    for wnid in TINY_WNIDS:
        colour = _colour(order.index(wnid))
        for i in range(per_class):
            _image(folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", colour, size=(64, 64), fmt="JPEG")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(
            "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))
    lines, number = [], 0
    for repeat in range(val_per_class):
        for wnid in TINY_WNIDS:
            _image(folder / "val" / "images" / f"val_{number}.JPEG", _colour(order.index(wnid)), size=(64, 64),
                   fmt="JPEG")
            lines.append(f"val_{number}.JPEG\t{wnid}\t1\t2\t60\t61")
            number += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _image(folder / "test" / "images" / "test_0.JPEG", (0, 0, 0), size=(64, 64), fmt="JPEG")
    return folder


def test_tiny_imagenet_train_and_val(tmp_path):
    folder = _tiny(tmp_path)
    train = load_dataset(tmp_path, res=16, cache_dir=tmp_path / "c")  # the parent works
    assert train.class_names == ["goldfish", "Egyptian cat", "reel"]  # sorted wnids, names from words.txt
    assert train.class_counts() == [3, 3, 3]
    val = load_dataset(folder, split="val", res=16, cache_dir=tmp_path / "c")
    test = load_dataset(folder, split="test", res=16, cache_dir=tmp_path / "c")  # test/ has no labels
    assert val.class_counts() == [2, 2, 2] and torch.equal(test.images, val.images)
    for data in (train, val):
        for k in range(3):
            assert all(np.allclose(c, _colour(k), atol=8) for c in _centre(data, k))
    with pytest.raises(LD3MError, match="not to Tiny-ImageNet"):
        load_dataset(folder, subset="nette", res=16, cache_dir=tmp_path / "c")


def test_tiny_imagenet_damaged_layouts(tmp_path):
    folder = _tiny(tmp_path / "a")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09999999\t1 2 3 4\n")
    with pytest.raises(LD3MError, match="labels images with n09999999, which wnids.txt does not list"):
        load_dataset(folder, split="val", res=16, cache_dir=tmp_path / "c")
    (folder / "val" / "val_annotations.txt").unlink()
    with pytest.raises(LD3MError, match="labelled held-out split is .*val_annotations.txt is missing"):
        load_dataset(folder, split="val", res=16, cache_dir=tmp_path / "c")
    for path in (folder / "train" / "n04067472" / "images").iterdir():
        path.unlink()
    with pytest.raises(LD3MError, match="n04067472/images holds no image files"):
        load_dataset(folder, res=16, cache_dir=tmp_path / "c")
    (folder / "wnids.txt").write_text("n02124075\nnot-a-wnid\n")
    with pytest.raises(LD3MError, match="wnids.txt: 'not-a-wnid' is not a wnid"):
        load_dataset(folder, res=16, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- imagenet-1k

def test_imagenet_1k_subset_reads_all_classes_in_index_order(tmp_path):
    full = resolve_subset("imagenet-1k")
    assert full.imagenet_indices == tuple(range(1000)) and full.wnids == list(imagenet_wnids())
    for alias in ("imagenet", "in1k", "IMAGENET_1K", "ilsvrc2012"):
        assert resolve_subset(alias).name == "imagenet-1k"
    root = tmp_path / "imagenet"
    for index, wnid in enumerate(imagenet_wnids()):
        _image(root / "train" / wnid / f"{wnid}_1.JPEG", (index % 250, index // 250 * 60, 0), size=(8, 8), fmt="PNG")
    _image(root / "train" / "n99999999" / "x.JPEG", (0, 0, 0), size=(8, 8))  # not an ImageNet-1k class
    data = load_dataset(root, subset="imagenet-1k", res=8, cache_dir=tmp_path / "c")
    assert data.labels.tolist() == list(range(1000)) and data.class_names == list(imagenet_class_names())
    red, green = data.images[:, 0, 4, 4].tolist(), data.images[:, 1, 4, 4].tolist()
    assert [r + g // 60 * 250 for r, g in zip(red, green)] == list(range(1000))
    for wnid in ("n01440764", "n15075141"):  # the first and the last class
        (root / "train" / wnid).rename(tmp_path / "aside")
        with pytest.raises(LD3MError, match=f"class folder .*{wnid} .* of subset imagenet-1k is missing"):
            load_dataset(root, subset="in1k", res=8, cache_dir=tmp_path / "c")
        (tmp_path / "aside").rename(root / "train" / wnid)
