"""Readers for the supported on-disk formats. Each returns decoded uint8 arrays.

- class-folder trees (ImageNet `train/<wnid>/*.JPEG`, any ImageFolder `<class>/*`);
- CIFAR-10 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`);
- IDX files (MNIST / Fashion-MNIST: `train-images-idx3-ubyte[.gz]`, ...).
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import re
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from ld3m_fast.data import decode
from ld3m_fast.errors import LD3MError

WNID_PATTERN = re.compile(r"^n\d{8}$")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]


# ----------------------------------------------------------------------------- class folders

def class_subfolders(folder: Path) -> list[Path]:
    """Visible subfolders of `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (by extension, case-insensitive), sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in decode.IMAGE_EXTENSIONS)


def files_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file: changes when the data on disk changes."""
    out = []
    for path in files:
        stat = path.stat()
        out.append((str(path), stat.st_size, stat.st_mtime_ns))
    return out


def _decode_or_none(path: Path, res: int):
    try:
        # Looked up through the module so that tests can count decoder calls.
        return decode.decode_image_file(path, res)
    except (OSError, ValueError, SyntaxError, decode.Image.DecompressionBombError) as error:
        return error


def decode_class_files(files_per_class: list[list[Path]], class_names: list[str], res: int,
                       log: Callable[[str], None] = print, workers: int | None = None):
    """Decode every file; skip unreadable ones with a warning; fail if a class ends up empty.

    Returns (images (N, 3, res, res) uint8, labels (N,) int64) as numpy arrays.
    """
    jobs = [(path, label) for label, files in enumerate(files_per_class) for path in files]
    workers = workers or min(8, os.cpu_count() or 1)
    log(f"decoding {len(jobs)} images of {len(class_names)} classes at {res}x{res} "
        f"({workers} threads)")
    # Pillow releases the GIL while decoding and resizing, so threads scale.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda job: _decode_or_none(job[0], res), jobs))
    images, labels, skipped = [], [], []
    first_failure: dict[int, str] = {}
    for (path, label), result in zip(jobs, results):
        if isinstance(result, np.ndarray):
            images.append(result)
            labels.append(label)
        else:
            reason = " ".join(f"{type(result).__name__}: {result}".split())
            skipped.append(f"{path} ({reason})")
            first_failure.setdefault(label, f"{path.name}: {reason}")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_names))
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        # Fatal: the reason goes into the one-line error rather than a separate warning.
        raise LD3MError(f"no readable images for class(es) {', '.join(class_names[k] for k in empty)} "
                        f"(e.g. {first_failure[empty[0]][:200]}): replace or remove the "
                        "unreadable files")
    if skipped:
        shown = "; ".join(skipped[:5]) + (f"; ... {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s): {shown}", stacklevel=2)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ----------------------------------------------------------------------------- CIFAR-10

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes/lists/numpy arrays) and nothing else.

    The batches are pickles supplied by the user; refusing every global except numpy's
    array reconstruction keeps a tampered file from running code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_cifar_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - anything a damaged pickle makes the unpickler raise
        # (random bytes give UnpicklingError, EOFError, ValueError, TypeError, OverflowError,
        # LookupError, MemoryError, ...): all of them mean "not a CIFAR-10 batch".
        message = " ".join(str(error).split()) or type(error).__name__
        raise LD3MError(f"cannot read CIFAR-10 batch {path}: {message[:200]}; replace it with the "
                        "file from the cifar-10-python.tar.gz archive") from None
    if not isinstance(content, dict):
        raise LD3MError(f"CIFAR-10 batch {path} holds a {type(content).__name__}, not a dict: "
                        "replace it with the file from the cifar-10-python.tar.gz archive")
    # Keys are bytes with encoding="bytes"; normalise to str.
    return {(k.decode(errors="replace") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _cifar_batch_arrays(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch, checked.

    `data` must be N rows of 3072 integers in 0..255 (a float or wider array would
    otherwise be cast to uint8 silently) and `labels` N integers.
    """
    def bad(problem: str):
        raise LD3MError(f"CIFAR-10 batch {path}: {problem}; replace it with the file from the "
                        "cifar-10-python.tar.gz archive")

    if "data" not in batch or "labels" not in batch:
        bad(f"no 'data' and 'labels' entries (it has: {', '.join(map(str, batch)) or 'nothing'})")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        bad(f"'data' must be an (N, 3072) array, got "
            f"{data.shape if isinstance(data, np.ndarray) else type(data).__name__}")
    if data.dtype != np.uint8 and not (np.issubdtype(data.dtype, np.integer) and data.size
                                       and 0 <= data.min() and data.max() <= 255):
        bad(f"'data' must hold integers in 0..255, got {data.dtype}")
    try:
        labels = np.asarray(labels)
    except ValueError:
        labels = np.asarray([], dtype=object)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        bad(f"'labels' must be {data.shape[0]} integers (one per row of 'data'), got "
            f"{labels.shape} {labels.dtype}")
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def cifar10_batch_files(folder: Path, split: str) -> list[Path]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise LD3MError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}: "
                        "point --data at the extracted cifar-10-batches-py folder")
    return [folder / n for n in names]


def read_cifar10(folder: Path, split: str):
    """-> (images (N, 32, 32, 3) uint8, labels (N,) int64, class_names)."""
    images, labels = [], []
    for path in cifar10_batch_files(folder, split):
        batch_images, batch_labels = _cifar_batch_arrays(_load_cifar_pickle(path), path)
        images.append(batch_images)
        labels.append(batch_labels)
    meta_path = folder / "batches.meta"
    class_names = read_cifar10_names(meta_path) if meta_path.is_file() else list(CIFAR10_CLASSES)
    return np.concatenate(images), np.concatenate(labels), class_names


def read_cifar10_names(meta_path: Path) -> list[str]:
    """Class names from `batches.meta` (falls back to the standard CIFAR-10 names)."""
    names = _load_cifar_pickle(meta_path).get("label_names")
    if names is None or (isinstance(names, list) and not names):
        return list(CIFAR10_CLASSES)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise LD3MError(f"{meta_path}: 'label_names' must be a list of class names; replace it "
                        "with the file from the cifar-10-python.tar.gz archive (or delete it to "
                        "use the standard CIFAR-10 names)")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HINT = "replace it with the original download"


def read_idx_file(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped) -> numpy array with its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise LD3MError(f"cannot read IDX file {path}: {error}; {_IDX_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise LD3MError(f"{path} is not an IDX file (bad magic number); {_IDX_HINT}")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise LD3MError(f"IDX file {path} is truncated or corrupt (its header is cut short); "
                        f"{_IDX_HINT}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize  # Python ints: no overflow for absurd dims
    if len(raw) - offset != expected:
        raise LD3MError(f"IDX file {path} is truncated or corrupt "
                        f"({len(raw) - offset} data bytes, expected {expected}); {_IDX_HINT}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def idx_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) paths for the split, gzipped or not; None when absent."""
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        candidates = [folder / kind, folder / f"{kind}.gz"]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found.append(existing[0])
    return found[0], found[1]


def read_idx_folder(folder: Path, split: str):
    """-> (images (N, 28, 28) uint8, labels (N,) int64)."""
    paths = idx_files(folder, split)
    if paths is None:
        raise LD3MError(f"{folder} has no {split} IDX files (train-images-idx3-ubyte[.gz] / "
                        "t10k-images-idx3-ubyte[.gz] and the matching labels)")
    images = read_idx_file(paths[0])
    labels = read_idx_file(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise LD3MError(f"IDX files in {folder} disagree: images {images.shape}, labels {labels.shape}")
    if images.dtype != np.uint8 or 0 in images.shape:
        raise LD3MError(f"IDX images {paths[0]} must be (N, H, W) unsigned bytes with H, W > 0, got "
                        f"{images.shape} {images.dtype}; {_IDX_HINT}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LD3MError(f"IDX labels {paths[1]} must be integers, got {labels.dtype}; {_IDX_HINT}")
    return images, labels.astype(np.int64)
