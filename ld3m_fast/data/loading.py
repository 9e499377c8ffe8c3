"""`load_dataset`: one entry point for every supported source, with an on-disk uint8 cache.

Sources (auto-detected from the folder's contents):

- ImageNet tree: `root/train/<wnid>/*.JPEG`, `root/val/<wnid>/*` (wnid = n########);
  `subset=` picks one of the 10-class lists of `ld3m_fast.data.subsets`;
- any ImageFolder tree: `root/<split>/<class>/*` (or `root/<class>/*` for split="train"),
  classes = subfolders in sorted order;
- CIFAR-10 python batches: the `cifar-10-batches-py` folder (or its parent);
- IDX files (MNIST layout): `train-images-idx3-ubyte[.gz]` etc.;
- the word `fashion-mnist`: Debian's `dataset-fashion-mnist` under
  /usr/share/datasets/fashion-mnist when installed, else the subset bundled with the package.

Decoded sets are cached as uncompressed uint8 `.npz` under `cache_dir`, keyed by the source
path, split, subset, res, max_per_class and a fingerprint of the files read (paths, sizes,
mtimes), so an edited data folder is decoded again instead of served stale.
"""
from __future__ import annotations

import hashlib
import numbers
import json
import os
import time
import warnings
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ld3m_fast.data import readers
from ld3m_fast.data.decode import resize_array_batch
from ld3m_fast.data.imageset import ImageSet
from ld3m_fast.data.subsets import imagenet_class_names, resolve_subset, wnid_to_index
from ld3m_fast._files import atomic_write, user_cache_dir
from ld3m_fast.errors import LD3MError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FASHION_MNIST = "fashion_mnist_subset.npz"
CACHE_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
# Folder names tried for each split, in order. ImageNet's held-out split is `val`.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "test"),
                  "test": ("test", "val", "validation")}

Log = Callable[[str], None]


def default_cache_dir() -> Path:
    return user_cache_dir("data")


@dataclass
class _Plan:
    """What will be read: enough to build the cache key without decoding anything."""

    kind: str
    label: str
    class_names: list[str]
    fingerprint: object
    decode: Callable[[], tuple[torch.Tensor, torch.Tensor]]


def load_dataset(source: str | os.PathLike, *, split: str = "train", subset: str | None = None,
                 res: int, cache_dir: str | os.PathLike | None = None,
                 max_per_class: int | None = None, log: Log = print) -> ImageSet:
    """Read, decode (shorter side -> res, centre crop, RGB) and cache a labelled image set.

    source: a folder (see module docstring) or the word "fashion-mnist".
    split: "train", "val" or "test" ("val" and "test" both mean the held-out split).
    subset: ImageNet subset name or alias (only for ImageNet wnid trees).
    max_per_class: keep the first n images of each class (sorted file order / file order).
    Returns an `ImageSet` with images (N, 3, res, res) uint8 and labels (N,) int64.
    Raises `LD3MError` (one line) for anything the user can fix.
    """
    if split not in SPLITS:
        raise LD3MError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if isinstance(res, bool) or not isinstance(res, numbers.Integral) or res < 8:
        raise LD3MError(f"resolution must be an integer >= 8, got {res!r}")
    if max_per_class is not None and max_per_class < 1:
        raise LD3MError(f"max_per_class must be >= 1, got {max_per_class}")
    plan = _plan(source, split, subset, res, max_per_class, log)
    cache_path = _cache_path(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
                             plan, split, subset, res, max_per_class)
    cached = _read_cache(cache_path, res, plan.class_names)
    if cached is not None:
        images, labels, class_names = cached
        log(f"loaded {len(labels)} cached images ({plan.label}) from {cache_path}")
    else:
        started = time.perf_counter()
        images, labels = plan.decode()
        class_names = plan.class_names
        _write_cache(cache_path, images, labels, class_names)
        log(f"decoded {len(labels)} images ({plan.label}) in {time.perf_counter() - started:.1f}s; "
            f"cached at {cache_path}")
    return ImageSet(images, labels, list(class_names), description=plan.label)


# ----------------------------------------------------------------------------- planning

def _plan(source, split, subset, res, max_per_class, log) -> _Plan:
    if str(source).strip().lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        _reject_subset(subset, "fashion-mnist")
        return _fashion_mnist_plan(split, res, max_per_class, log)
    root = Path(source).expanduser()
    if not root.exists():
        raise LD3MError(f"data folder {root} does not exist: pass an existing folder or "
                        "'fashion-mnist'")
    if not root.is_dir():
        raise LD3MError(f"data source {root} is not a folder: pass the dataset's root folder")
    root = root.resolve()
    cifar_dir = _cifar_dir(root)
    if cifar_dir is not None:
        _reject_subset(subset, "CIFAR-10")
        return _cifar_plan(cifar_dir, split, res, max_per_class)
    if readers.idx_files(root, "train") or readers.idx_files(root, "test"):
        _reject_subset(subset, "IDX files")
        names = (readers.FASHION_MNIST_CLASSES if "fashion" in str(root).lower()
                 else [str(d) for d in range(10)])
        return _idx_plan(root, split, res, max_per_class, names, f"IDX {root}")
    return _folder_plan(root, split, subset, res, max_per_class, log)


def _reject_subset(subset, what):
    if subset:
        raise LD3MError(f"--subset applies to ImageNet folder trees, not to {what}: drop it")


def _cifar_dir(root: Path) -> Path | None:
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    return None


def _first_per_class(labels: np.ndarray, n: int | None) -> np.ndarray:
    """Positions of the first n samples of every class, in original order."""
    if n is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for k in np.unique(labels):
        keep[np.flatnonzero(labels == k)[:n]] = True
    return np.flatnonzero(keep)


def _array_result(images: np.ndarray, labels: np.ndarray, num_classes: int, res: int,
                  max_per_class: int | None, what: str):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise LD3MError(f"{what}: labels outside 0..{num_classes - 1}")
    keep = _first_per_class(labels, max_per_class)
    empty = sorted(set(range(num_classes)) - set(np.unique(labels[keep]).tolist()))
    if empty:
        raise LD3MError(f"{what}: no images for class(es) {empty}")
    return resize_array_batch(images[keep], res), torch.from_numpy(labels[keep].astype(np.int64))


def _cifar_plan(folder: Path, split: str, res: int, max_per_class) -> _Plan:
    files = readers.cifar10_batch_files(folder, split)

    def decode():
        images, labels, names = readers.read_cifar10(folder, split)
        return _array_result(images, labels, len(names), res, max_per_class, f"CIFAR-10 {folder}")

    meta = folder / "batches.meta"
    names = (readers.read_cifar10_names(meta) if meta.is_file() else list(readers.CIFAR10_CLASSES))
    return _Plan("cifar10", f"CIFAR-10 {split} {res}px", names,
                 readers.files_fingerprint(files + ([meta] if meta.is_file() else [])), decode)


def _idx_plan(folder: Path, split: str, res: int, max_per_class, class_names, label) -> _Plan:
    paths = readers.idx_files(folder, split)
    if paths is None:
        raise LD3MError(f"{folder} has no {split} IDX files (train-images-idx3-ubyte[.gz] / "
                        "t10k-images-idx3-ubyte[.gz] and the matching labels)")

    def decode():
        images, labels = readers.read_idx_folder(folder, split)
        return _array_result(images, labels, len(class_names), res, max_per_class, label)

    return _Plan("idx", f"{label} {split} {res}px", list(class_names),
                 readers.files_fingerprint(list(paths)), decode)


def _fashion_mnist_plan(split: str, res: int, max_per_class, log) -> _Plan:
    if readers.idx_files(FASHION_MNIST_DIR, split) is not None:
        log(f"using the full Fashion-MNIST from {FASHION_MNIST_DIR}")
        return _idx_plan(FASHION_MNIST_DIR, split, res, max_per_class,
                         readers.FASHION_MNIST_CLASSES, "Fashion-MNIST")
    log(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR} (apt-get install "
        "dataset-fashion-mnist); using the bundled subset (300 train / 100 test per class)")
    bundled = resources.files("ld3m_fast.data").joinpath(BUNDLED_FASHION_MNIST)
    prefix = "train" if split == "train" else "test"

    def decode():
        with resources.as_file(bundled) as path, np.load(path, allow_pickle=False) as archive:
            images, labels = archive[f"{prefix}_images"], archive[f"{prefix}_labels"]
        return _array_result(images, labels.astype(np.int64), 10, res, max_per_class,
                             "bundled Fashion-MNIST")

    with resources.as_file(bundled) as path:
        fingerprint = readers.files_fingerprint([Path(path)])
    return _Plan("fashion-mnist-bundled", f"bundled Fashion-MNIST subset {split} {res}px",
                 list(readers.FASHION_MNIST_CLASSES), fingerprint, decode)


def _split_folder(root: Path, split: str) -> Path | None:
    for name in _SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _folder_plan(root: Path, split: str, subset, res, max_per_class, log) -> _Plan:
    split_dir = _split_folder(root, split)
    if split_dir is None:
        has_any_split = any((root / n).is_dir() for names in _SPLIT_FOLDERS.values() for n in names)
        if split == "train" and not has_any_split:
            split_dir = root  # a plain ImageFolder tree: root/<class>/*
        else:
            raise LD3MError(f"{root} has no '{'/'.join(_SPLIT_FOLDERS[split])}' folder for the "
                            f"{split} split: expected {root}/{_SPLIT_FOLDERS[split][0]}/<class>/<images>")
    class_dirs = readers.class_subfolders(split_dir)
    if not class_dirs:
        loose = readers.list_image_files(split_dir)
        hint = ("it holds images directly; sort them into one subfolder per class (for ImageNet "
                "val: <wnid> folders)" if loose else "it is empty")
        raise LD3MError(f"no class folders in {split_dir}: {hint}")
    is_imagenet = all(readers.WNID_PATTERN.match(d.name) for d in class_dirs)
    if subset:
        if not is_imagenet:
            raise LD3MError(f"--subset needs an ImageNet tree of <wnid> folders, but {split_dir} "
                            "has other class folders: drop --subset")
        chosen = resolve_subset(subset)
        class_dirs = []
        for wnid, name in zip(chosen.wnids, chosen.class_names):
            folder = split_dir / wnid
            if not folder.is_dir():
                raise LD3MError(f"class folder {folder} ({name}) of subset {chosen.name} is missing")
            class_dirs.append(folder)
        class_names, label = chosen.class_names, f"{chosen.name} {split} {res}px"
    elif is_imagenet:
        index = wnid_to_index()
        class_dirs.sort(key=lambda d: (index.get(d.name, 10**6), d.name))
        all_names = imagenet_class_names()
        class_names = [all_names[index[d.name]] if d.name in index else d.name for d in class_dirs]
        label = f"ImageNet tree {root.name} {split} {res}px ({len(class_dirs)} classes)"
    else:
        class_names = [d.name for d in class_dirs]
        label = f"ImageFolder {root.name} {split} {res}px ({len(class_dirs)} classes)"
    files_per_class = []
    for folder in class_dirs:
        files = readers.list_image_files(folder)[:max_per_class]
        if not files:
            raise LD3MError(f"class folder {folder} holds no image files")
        files_per_class.append(files)

    def decode():
        images, labels = readers.decode_class_files(files_per_class, class_names, res, log=log)
        return torch.from_numpy(images), torch.from_numpy(labels)

    fingerprint = readers.files_fingerprint([p for files in files_per_class for p in files])
    return _Plan("imagenet" if is_imagenet else "imagefolder", label, class_names, fingerprint, decode)


# ----------------------------------------------------------------------------- cache

def _cache_path(cache_dir: Path, plan: _Plan, split, subset, res, max_per_class) -> Path:
    key = json.dumps({"version": CACHE_FORMAT_VERSION, "kind": plan.kind, "split": split,
                      "subset": resolve_subset(subset).name if subset else None, "res": res,
                      "max_per_class": max_per_class, "files": plan.fingerprint},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_dir / f"{plan.kind}-{split}-{res}px-{digest}.npz"


def _read_cache(path: Path, res: int, class_names: list[str]):
    """The cached (images, labels, class_names), or None (with a warning) when the file is
    unreadable or does not hold what this key promises: it is then decoded again."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
            labels = archive["labels"]
            cached_names = [str(n) for n in archive["class_names"]]
        if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, res, res)
                or labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer)
                or cached_names != list(class_names)
                or (labels.size and (labels.min() < 0 or labels.max() >= len(class_names)))):
            raise ValueError(f"unexpected content: images {images.shape} {images.dtype}, "
                             f"labels {labels.shape} {labels.dtype}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(f"ignoring unreadable data cache {path} ({error}); decoding again",
                      stacklevel=3)
        return None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), cached_names


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, class_names) -> None:
    """Atomic: a crash leaves either no cache file or a complete one."""
    try:
        with atomic_write(path, suffix=".npz") as tmp:
            np.savez(tmp, images=images.numpy(), labels=labels.numpy(),
                     class_names=np.asarray(class_names, dtype=np.str_))
    except OSError as error:
        # A read-only cache location must not stop the run; it only costs the next start.
        warnings.warn(f"could not write data cache {path}: {error}", stacklevel=3)
