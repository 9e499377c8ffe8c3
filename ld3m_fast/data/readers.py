"""Readers for the supported on-disk formats: file lists and label lists for image files,
uint8 arrays for the array formats.

- class-folder trees (ImageNet `train/<wnid>/*.JPEG`, any ImageFolder `<class>/*`);
- ImageNet's flat validation folder (`val/ILSVRC2012_val_00000001.JPEG`, ...) labelled by
  the devkit's `ILSVRC2012_validation_ground_truth.txt` + `meta.mat`, or by Kaggle's
  `LOC_val_solution.csv`;
- Tiny-ImageNet (`wnids.txt`, `words.txt`, `train/<wnid>/images/*`, `val/images/*` +
  `val/val_annotations.txt`);
- CIFAR-10 python batches (`data_batch_1..5`, `test_batch`, `batches.meta`) and CIFAR-100
  (`train`, `test`, `meta`; fine labels);
- IDX files (MNIST / Fashion-MNIST: `train-images-idx3-ubyte[.gz]`, ...).
"""
from __future__ import annotations

import csv
import gzip
import math
import os
import pickle
import re
import zlib
from pathlib import Path

import numpy as np

from ld3m_fast.data import decode
from ld3m_fast.data.matfile import read_mat
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


def image_names(folder: Path) -> list[str]:
    """Names of the image files directly inside `folder` (by extension, case-insensitive),
    sorted. Names, not paths: a million of them stay small."""
    with os.scandir(folder) as entries:
        return sorted(entry.name for entry in entries
                      if not entry.name.startswith(".") and entry.is_file()
                      and os.path.splitext(entry.name)[1].lower() in decode.IMAGE_EXTENSIONS)


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (by extension, case-insensitive), sorted by name."""
    return [folder / name for name in image_names(folder)]


# ----------------------------------------------------------------------------- ImageNet val labels

VAL_SOLUTION = "LOC_val_solution.csv"
VAL_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
_DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"


def label_file_candidates(split_dir: Path, name: str, levels: int = 4) -> list[Path]:
    """Where a label file of ImageNet's flat val folder may be: in the folder, beside it, in
    an extracted devkit there, and up to `levels` folders above (Kaggle keeps its CSV three
    levels above `ILSVRC/Data/CLS-LOC/val`)."""
    places = [split_dir]
    for parent in list(split_dir.parents)[:levels]:
        places += [parent, parent / _DEVKIT_DATA]
    return [place / name for place in places]


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def find_val_labels(split_dir: Path) -> tuple[list[Path], dict[str, str]] | None:
    """(label files, {image name without extension: wnid}) for a flat ImageNet val folder,
    from `LOC_val_solution.csv` or from the devkit's ground truth and `meta.mat`; None when
    neither is found. Raises `LD3MError` for a label file that cannot be read, and for a
    ground-truth list without its `meta.mat`."""
    solution = _first_existing(label_file_candidates(split_dir, VAL_SOLUTION))
    if solution is not None:
        return [solution], read_val_solution(solution)
    truth = _first_existing(label_file_candidates(split_dir, VAL_GROUND_TRUTH))
    if truth is None:
        return None
    meta = _first_existing([truth.parent / DEVKIT_META] + label_file_candidates(split_dir, DEVKIT_META))
    if meta is None:
        raise LD3MError(f"{truth} gives devkit class ids, which map to wnids only through the devkit's "
                        f"{DEVKIT_META}: put ILSVRC2012_devkit_t12/data/{DEVKIT_META} beside it (or use "
                        f"{VAL_SOLUTION})")
    wnid_of_id = read_devkit_wnids(meta)
    ids = read_ground_truth(truth)
    unknown = sorted(set(ids) - set(wnid_of_id))
    if unknown:
        raise LD3MError(f"{truth} uses class id {unknown[0]}, which {meta} does not define (ids 1..1000 "
                        "are the ILSVRC2012 classes): is it the devkit of another year?")
    return [truth, meta], {f"ILSVRC2012_val_{i:08d}": wnid_of_id[k] for i, k in enumerate(ids, start=1)}


def read_val_solution(path: Path) -> dict[str, str]:
    """Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, the wnid first in each
    prediction string) -> {image id: wnid}."""
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise ValueError(f"header {header!r}, expected ImageId,PredictionString")
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                words = row[1].split() if len(row) > 1 else []
                if not words or not WNID_PATTERN.match(words[0]):
                    raise ValueError(f"line {line} has no wnid first in its PredictionString")
                labels[row[0].strip()] = words[0]
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise LD3MError(f"cannot read {path}: {error}; replace it with Kaggle's {VAL_SOLUTION}") from None
    return labels


def read_ground_truth(path: Path) -> list[int]:
    """`ILSVRC2012_validation_ground_truth.txt`: one devkit class id (1-based) per image, in
    image order (line i labels ILSVRC2012_val_0000000i)."""
    try:
        ids = [int(line) for line in path.read_text(encoding="ascii").split()]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LD3MError(f"cannot read {path}: {error}; it must hold one class id per line (the devkit's "
                        "file)") from None
    return ids


def read_devkit_wnids(path: Path) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} of the 1000 classes from the devkit's `meta.mat` (`synsets`)."""
    try:
        synsets = read_mat(path).get("synsets")
        if not isinstance(synsets, list):
            raise ValueError("it has no 'synsets' struct array")
        table = {}
        for synset in synsets:
            ilsvrc_id = int(np.asarray(synset["ILSVRC2012_ID"]).reshape(-1)[0])
            wnid = synset["WNID"]
            if 1 <= ilsvrc_id <= 1000 and isinstance(wnid, str) and WNID_PATTERN.match(wnid):
                table[ilsvrc_id] = wnid
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise LD3MError(f"cannot read the devkit's {path}: {error}; replace it with "
                        f"ILSVRC2012_devkit_t12/data/{DEVKIT_META}") from None
    return table


def val_image_id(name: str) -> str:
    """`ILSVRC2012_val_00000001.JPEG` -> `ILSVRC2012_val_00000001` (the key of both label files)."""
    return os.path.splitext(name)[0]


# ----------------------------------------------------------------------------- Tiny-ImageNet

TINY_WNIDS = "wnids.txt"
TINY_WORDS = "words.txt"
TINY_VAL_ANNOTATIONS = Path("val") / "val_annotations.txt"


def is_tiny_imagenet(root: Path) -> bool:
    return (root / TINY_WNIDS).is_file() and ((root / "train").is_dir() or (root / TINY_VAL_ANNOTATIONS).is_file())


def read_tiny_wnids(root: Path) -> list[str]:
    """The classes of a Tiny-ImageNet folder (`wnids.txt`), sorted: the label order of
    ImageFolder on its train/ folder, which other distillation code uses."""
    path = root / TINY_WNIDS
    try:
        wnids = path.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    bad = [w for w in wnids if not WNID_PATTERN.match(w)]
    if bad or not wnids or len(set(wnids)) != len(wnids):
        problem = f"{bad[0]!r} is not a wnid" if bad else ("it is empty" if not wnids else "it repeats a wnid")
        raise LD3MError(f"{path}: {problem}; it must list one wnid (n########) per line")
    return sorted(wnids)


def read_words(path: Path, wnids: list[str]) -> dict[str, str]:
    """{wnid: first lemma} for `wnids` from a `words.txt` (`wnid<TAB>lemma, lemma, ...`)."""
    wanted, names = set(wnids), {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                wnid, _, lemmas = line.rstrip("\n").partition("\t")
                if wnid in wanted:
                    names[wnid] = lemmas.split(",")[0].strip() or wnid
    except (OSError, UnicodeDecodeError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    return names


def read_tiny_val_annotations(path: Path) -> dict[str, str]:
    """`val/val_annotations.txt` (`file<TAB>wnid<TAB>x y w h`) -> {file name: wnid}."""
    labels = {}
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or not WNID_PATTERN.match(fields[1].strip()):
                raise ValueError(f"line {number} is not 'file<TAB>wnid<TAB>box'")
            labels[fields[0].strip()] = fields[1].strip()
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    return labels


# ----------------------------------------------------------------------------- CIFAR-10 / CIFAR-100

CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FILES = ("train", "test", "meta")


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


def _load_cifar_pickle(path: Path, what: str = "CIFAR-10 batch", archive: str = CIFAR10_ARCHIVE) -> dict:
    try:
        with open(path, "rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - anything a damaged pickle makes the unpickler raise
        # (random bytes give UnpicklingError, EOFError, ValueError, TypeError, OverflowError,
        # LookupError, MemoryError, ...): all of them mean "not a CIFAR batch".
        message = " ".join(str(error).split()) or type(error).__name__
        raise LD3MError(f"cannot read {what} {path}: {message[:200]}; replace it with the "
                        f"file from the {archive} archive") from None
    if not isinstance(content, dict):
        raise LD3MError(f"{what} {path} holds a {type(content).__name__}, not a dict: "
                        f"replace it with the file from the {archive} archive")
    # Keys are bytes with encoding="bytes"; normalise to str.
    return {(k.decode(errors="replace") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _cifar_batch_arrays(batch: dict, path: Path, label_key: str = "labels", what: str = "CIFAR-10 batch",
                        archive: str = CIFAR10_ARCHIVE) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of one batch, checked.

    `data` must be N rows of 3072 integers in 0..255 (a float or wider array would
    otherwise be cast to uint8 silently) and `label_key` N integers.
    """
    def bad(problem: str):
        raise LD3MError(f"{what} {path}: {problem}; replace it with the file from the {archive} archive")

    if "data" not in batch or label_key not in batch:
        bad(f"no 'data' and '{label_key}' entries (it has: {', '.join(map(str, batch)) or 'nothing'})")
    data, labels = batch["data"], batch[label_key]
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
        bad(f"'{label_key}' must be {data.shape[0]} integers (one per row of 'data'), got "
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


def _label_names(meta_path: Path, key: str, what: str, archive: str, or_else: str = "") -> list[str] | None:
    """The list `key` of a CIFAR meta pickle (None when it is absent or empty)."""
    names = _load_cifar_pickle(meta_path, what, archive).get(key)
    if names is None or (isinstance(names, list) and not names):
        return None
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise LD3MError(f"{meta_path}: '{key}' must be a list of class names; replace it "
                        f"with the file from the {archive} archive{or_else}")
    return [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]


def read_cifar10_names(meta_path: Path) -> list[str]:
    """Class names from `batches.meta` (falls back to the standard CIFAR-10 names)."""
    names = _label_names(meta_path, "label_names", "CIFAR-10 batch", CIFAR10_ARCHIVE,
                         " (or delete it to use the standard CIFAR-10 names)")
    return names or list(CIFAR10_CLASSES)


def cifar100_folder(root: Path) -> Path | None:
    """The extracted `cifar-100-python` folder at or under `root`, if there is one."""
    for folder in (root, root / "cifar-100-python"):
        if all((folder / name).is_file() for name in CIFAR100_FILES):
            return folder
    return None


def read_cifar100_names(folder: Path) -> list[str]:
    """The 100 fine class names of `meta` (label order)."""
    names = _label_names(folder / "meta", "fine_label_names", "CIFAR-100 file", CIFAR100_ARCHIVE)
    if names is None or len(names) != 100:
        raise LD3MError(f"{folder / 'meta'}: 'fine_label_names' must list the 100 classes, got "
                        f"{0 if names is None else len(names)}; replace it with the file from the "
                        f"{CIFAR100_ARCHIVE} archive")
    return names


def read_cifar100(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100 `train` or `test` -> (images (N, 32, 32, 3) uint8, fine labels (N,) int64)."""
    path = folder / ("train" if split == "train" else "test")
    return _cifar_batch_arrays(_load_cifar_pickle(path, "CIFAR-100 file", CIFAR100_ARCHIVE), path,
                               label_key="fine_labels", what="CIFAR-100 file", archive=CIFAR100_ARCHIVE)


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
