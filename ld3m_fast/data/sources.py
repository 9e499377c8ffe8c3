"""What `load_dataset` reads, per format: classes, files, and how to fill the cache from them.

Planning lists files and reads label lists but decodes nothing, so the cache key (every
file's path, size and mtime) is known before any pixel is. Two kinds of source:

- `FileSource`: image files per class (ImageNet trees, ImageNet's flat val folder,
  Tiny-ImageNet, any ImageFolder tree), decoded by Pillow in worker processes;
- `ArraySource`: arrays already in memory at their native size (CIFAR-10/100, IDX files,
  the bundled Fashion-MNIST subset), resized in chunks.

Either writes the cache one class at a time, class 0 first: rows are grouped by class,
each class's images in file order (for the array formats: in their order in the file).
"""
from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from contextlib import closing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from ld3m_fast.data import readers
from ld3m_fast.data.cache import BlockWriter, CacheKey, row_bytes
from ld3m_fast.data.decode import resize_array_batch
from ld3m_fast.data.parallel import chunk_rows, decode_in_order, worker_count
from ld3m_fast.data.subsets import imagenet_class_names, resolve_subset, wnid_to_index
from ld3m_fast.errors import LD3MError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FASHION_MNIST = "fashion_mnist_subset.npz"
# Folder names tried for each split, in order. ImageNet's held-out split is `val`.
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "test"),
                 "test": ("test", "val", "validation")}
SKIPPED_SHOWN = 5  # files named in the warning about skipped images

@dataclass
class DecodeOptions:
    res: int
    workers: int
    progress: bool | None


@dataclass
class ClassFiles:
    """The image files of one class: `names` inside `folder` (names, not paths: small)."""

    folder: str
    names: list[str]

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        return [os.path.join(self.folder, name) for name in self.names[start:stop]]


@dataclass
class FileSource:
    kind: str
    label: str
    class_names: list[str]
    class_files: list[ClassFiles]
    label_files: list[Path] = field(default_factory=list)

    def add_to_key(self, key: CacheKey) -> None:
        for path in self.label_files:
            key.add_file(path)
        for files in self.class_files:
            for path in files.paths():
                key.add_file(path)

    def fill(self, writer: BlockWriter, options: DecodeOptions) -> None:
        """Decode the classes `writer` does not hold yet into it."""
        remaining = list(enumerate(self.class_files))[writer.done_classes:]
        total = sum(len(files.names) for _, files in remaining)
        require_free_space(writer.folder, total * row_bytes(options.res))
        workers = worker_count(total, options.workers)
        logger.info(f"decoding {total} images of {len(remaining)} classes at {options.res}x{options.res} "
                    f"({workers} worker process{'es' if workers > 1 else ''}) into {writer.folder}, "
                    f"{total * row_bytes(options.res) / 1e9:.2f} GB"
                    + (f"; resuming after the first {writer.done_classes} classes, decoded before"
                       if writer.done_classes else ""))
        per_chunk = chunk_rows(options.res)
        jobs = (((k, start + per_chunk >= len(files.names)), files.paths(start, start + per_chunk))
                for k, files in remaining for start in range(0, len(files.names), per_chunk))
        skipped: list[str] = []
        reasons: list[tuple[str, str]] = []
        with _progress_bar(total, f"decoding {self.label}", options.progress) as bar, \
                closing(decode_in_order(jobs, options.res, workers)) as results:
            for (k, last), paths, rows, failures in results:
                writer.append(rows)
                reasons += [(paths[i], why) for i, why in failures]
                bar.update(len(paths))
                if last:
                    if writer.class_rows == 0:
                        path, why = reasons[0]
                        raise LD3MError(f"no readable images for class(es) {self.class_names[k]} (e.g. "
                                        f"{os.path.basename(path)}: {why[:200]}): replace or remove the "
                                        "unreadable files")
                    writer.end_class([f"{path} ({why})" for path, why in reasons])
                    skipped += [f"{path} ({why})" for path, why in reasons]
                    reasons = []
        warn_skipped(skipped)


@dataclass
class ArraySource:
    kind: str
    label: str
    class_names: list[str]
    files: list[Path]
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # images at native size, labels
    max_per_class: int | None

    def add_to_key(self, key: CacheKey) -> None:
        for path in self.files:
            key.add_file(path)

    def fill(self, writer: BlockWriter, options: DecodeOptions) -> None:
        images, labels = self.read()
        num_classes = len(self.class_names)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise LD3MError(f"{self.label}: labels outside 0..{num_classes - 1}")
        members = [np.flatnonzero(labels == k)[:self.max_per_class] for k in range(num_classes)]
        empty = [k for k, m in enumerate(members) if m.size == 0]
        if empty:
            raise LD3MError(f"{self.label}: no images for class(es) {empty}")
        remaining = members[writer.done_classes:]
        total = sum(m.size for m in remaining)
        require_free_space(writer.folder, total * row_bytes(options.res))
        per_chunk = chunk_rows(options.res)
        with _progress_bar(total, f"resizing {self.label}", options.progress) as bar:
            for rows in remaining:
                for start in range(0, rows.size, per_chunk):
                    chunk = rows[start:start + per_chunk]
                    writer.append(resize_array_batch(images[chunk], options.res).numpy())
                    bar.update(chunk.size)
                writer.end_class([])


def _progress_bar(total: int, description: str, progress: bool | None):
    from tqdm import tqdm

    # progress None: tqdm's choice (shown on a terminal, not in logs).
    return tqdm(total=total, desc=description, unit="img", dynamic_ncols=True,
                disable=None if progress is None else not progress)


def require_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise LD3MError(f"the decoded data needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB "
                        "free: pass --cache-dir DIR on a larger disk (or lower --max-per-class)")


def warn_skipped(skipped: list[str]) -> None:
    """One warning for every unreadable file of a decode."""
    if skipped:
        shown = "; ".join(skipped[:SKIPPED_SHOWN])
        more = f"; ... {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
        logger.warning("skipped %d unreadable image(s): %s%s", len(skipped), shown, more)


# ----------------------------------------------------------------------------- planning

def plan(source, split: str, subset: str | None, max_per_class: int | None, res: int):
    """The `FileSource` / `ArraySource` for `source`; raises `LD3MError` for what a user can fix."""
    if str(source).strip().lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        _reject_subset(subset, "fashion-mnist")
        return _fashion_mnist_plan(split, res, max_per_class)
    root = Path(source).expanduser()
    if not root.exists():
        raise LD3MError(f"data folder {root} does not exist: pass an existing folder or "
                        "'fashion-mnist'")
    if not root.is_dir():
        raise LD3MError(f"data source {root} is not a folder: pass the dataset's root folder")
    root = root.resolve()
    cifar_dir = _cifar10_dir(root)
    if cifar_dir is not None:
        _reject_subset(subset, "CIFAR-10")
        return _cifar10_plan(cifar_dir, split, res, max_per_class)
    cifar100_dir = readers.cifar100_folder(root)
    if cifar100_dir is not None:
        _reject_subset(subset, "CIFAR-100")
        return _cifar100_plan(cifar100_dir, split, res, max_per_class)
    if readers.idx_files(root, "train") or readers.idx_files(root, "test"):
        _reject_subset(subset, "IDX files")
        names = (readers.FASHION_MNIST_CLASSES if "fashion" in str(root).lower()
                 else [str(d) for d in range(10)])
        return _idx_plan(root, split, res, max_per_class, names, f"IDX {root}")
    tiny = _tiny_imagenet_dir(root)
    if tiny is not None:
        _reject_subset(subset, "Tiny-ImageNet")
        return _tiny_imagenet_plan(tiny, split, res, max_per_class)
    return _folder_plan(root, split, subset, res, max_per_class)


def _reject_subset(subset, what):
    if subset:
        raise LD3MError(f"--subset applies to ImageNet folder trees, not to {what}: drop it")


def _cifar10_dir(root: Path) -> Path | None:
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    return None


def _cifar10_plan(folder: Path, split: str, res: int, max_per_class) -> ArraySource:
    files = readers.cifar10_batch_files(folder, split)
    meta = folder / "batches.meta"
    names = readers.read_cifar10_names(meta) if meta.is_file() else list(readers.CIFAR10_CLASSES)

    def read():
        images, labels, _ = readers.read_cifar10(folder, split)
        return images, labels

    return ArraySource("cifar10", f"CIFAR-10 {split} {res}px", names,
                       files + ([meta] if meta.is_file() else []), read, max_per_class)


def _cifar100_plan(folder: Path, split: str, res: int, max_per_class) -> ArraySource:
    names = readers.read_cifar100_names(folder)
    path = folder / ("train" if split == "train" else "test")
    return ArraySource("cifar100", f"CIFAR-100 {split} {res}px", names, [path, folder / "meta"],
                       lambda: readers.read_cifar100(folder, split), max_per_class)


def _idx_plan(folder: Path, split: str, res: int, max_per_class, class_names, label) -> ArraySource:
    paths = readers.idx_files(folder, split)
    if paths is None:
        raise LD3MError(f"{folder} has no {split} IDX files (train-images-idx3-ubyte[.gz] / "
                        "t10k-images-idx3-ubyte[.gz] and the matching labels)")
    return ArraySource("idx", f"{label} {split} {res}px", list(class_names), list(paths),
                       lambda: readers.read_idx_folder(folder, split), max_per_class)


def _fashion_mnist_plan(split: str, res: int, max_per_class) -> ArraySource:
    if readers.idx_files(FASHION_MNIST_DIR, split) is not None:
        logger.info("using the full Fashion-MNIST from %s", FASHION_MNIST_DIR)
        return _idx_plan(FASHION_MNIST_DIR, split, res, max_per_class,
                         readers.FASHION_MNIST_CLASSES, "Fashion-MNIST")
    logger.info("Fashion-MNIST is not installed at %s (apt-get install dataset-fashion-mnist); using the "
                "bundled subset (300 train / 100 test per class)", FASHION_MNIST_DIR)
    bundled = resources.files("ld3m_fast.data").joinpath(BUNDLED_FASHION_MNIST)
    prefix = "train" if split == "train" else "test"

    def read():
        with resources.as_file(bundled) as path, np.load(path, allow_pickle=False) as archive:
            return archive[f"{prefix}_images"], archive[f"{prefix}_labels"].astype(np.int64)

    with resources.as_file(bundled) as path:
        files = [Path(path)]
    return ArraySource("fashion-mnist-bundled", f"bundled Fashion-MNIST subset {split} {res}px",
                       list(readers.FASHION_MNIST_CLASSES), files, read, max_per_class)


def _split_folder(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def _imagenet_names(wnids: list[str]) -> list[str]:
    index, names = wnid_to_index(), imagenet_class_names()
    return [names[index[w]] if w in index else w for w in wnids]


def _imagenet_order(wnids) -> list[str]:
    """wnids in ImageNet class-index order (wnids outside ImageNet-1k last, by name)."""
    index = wnid_to_index()
    return sorted(wnids, key=lambda w: (index.get(w, 10**6), w))


def _folder_plan(root: Path, split: str, subset, res, max_per_class) -> FileSource:
    split_dir = _split_folder(root, split)
    if split_dir is None:
        has_any_split = any((root / n).is_dir() for names in SPLIT_FOLDERS.values() for n in names)
        if split == "train" and not has_any_split:
            split_dir = root  # a plain ImageFolder tree: root/<class>/*
        else:
            raise LD3MError(f"{root} has no '{'/'.join(SPLIT_FOLDERS[split])}' folder for the "
                            f"{split} split: expected {root}/{SPLIT_FOLDERS[split][0]}/<class>/<images>")
    class_dirs = readers.class_subfolders(split_dir)
    if not class_dirs:
        return _flat_folder_plan(root, split_dir, split, subset, res, max_per_class)
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
        by_wnid = {d.name: d for d in class_dirs}
        class_dirs = [by_wnid[w] for w in _imagenet_order(by_wnid)]
        class_names = _imagenet_names([d.name for d in class_dirs])
        label = f"ImageNet tree {root.name} {split} {res}px ({len(class_dirs)} classes)"
    else:
        class_names = [d.name for d in class_dirs]
        label = f"ImageFolder {root.name} {split} {res}px ({len(class_dirs)} classes)"
    class_files = []
    for folder in class_dirs:
        names = readers.image_names(folder)[:max_per_class]
        if not names:
            raise LD3MError(f"class folder {folder} holds no image files")
        class_files.append(ClassFiles(str(folder), names))
    return FileSource("imagenet" if is_imagenet else "imagefolder", label, list(class_names), class_files)


def _flat_folder_plan(root: Path, split_dir: Path, split, subset, res, max_per_class) -> FileSource:
    """A split folder that holds images directly: ImageNet's val/ with a label list."""
    names = readers.image_names(split_dir)
    labels = readers.find_val_labels(split_dir) if names else None
    if labels is None:
        hint = (f"it holds images directly; sort them into one subfolder per class, or give their labels "
                f"(ImageNet val: the devkit's {readers.VAL_GROUND_TRUTH} and {readers.DEVKIT_META}, or "
                f"Kaggle's {readers.VAL_SOLUTION}, in or above {split_dir})" if names else "it is empty")
        raise LD3MError(f"no class folders in {split_dir}: {hint}")
    label_files, wnid_of = labels
    by_wnid = _group_by_label(names, lambda name: wnid_of.get(readers.val_image_id(name)), split_dir,
                              label_files[0])
    if subset:
        chosen = resolve_subset(subset)
        missing = [f"{w} ({n})" for w, n in zip(chosen.wnids, chosen.class_names) if w not in by_wnid]
        if missing:
            raise LD3MError(f"{split_dir} has no images of class {missing[0]} of subset {chosen.name} "
                            f"({len(missing)} class(es) missing) according to {label_files[0].name}")
        wnids, class_names, label = chosen.wnids, chosen.class_names, f"{chosen.name} {split} {res}px"
    else:
        wnids = _imagenet_order(by_wnid)
        class_names = _imagenet_names(wnids)
        label = f"ImageNet {split_dir.name}/ {split} {res}px ({len(wnids)} classes)"
    class_files = [ClassFiles(str(split_dir), by_wnid[w][:max_per_class]) for w in wnids]
    return FileSource("imagenet", label, list(class_names), class_files, label_files)


def _group_by_label(names: list[str], label_of, folder: Path, label_file: Path) -> dict[str, list[str]]:
    """{label: names in order} of the files that `label_of` labels; the rest are left out
    with one warning."""
    groups, unlabelled = defaultdict(list), []
    for name in names:
        label = label_of(name)
        (groups[label] if label is not None else unlabelled).append(name)
    if unlabelled:
        logger.warning("%d image file(s) in %s have no label in %s and are left out (e.g. %s)",
                       len(unlabelled), folder, label_file, unlabelled[0])
    return dict(groups)


def _tiny_imagenet_dir(root: Path) -> Path | None:
    for folder in (root, root / "tiny-imagenet-200"):
        if readers.is_tiny_imagenet(folder):
            return folder
    return None


def _tiny_imagenet_plan(root: Path, split: str, res: int, max_per_class) -> FileSource:
    wnids = readers.read_tiny_wnids(root)
    words = root / readers.TINY_WORDS
    known = readers.read_words(words, wnids) if words.is_file() else {}
    class_names = [known.get(w) or name for w, name in zip(wnids, _imagenet_names(wnids))]
    label_files = [root / readers.TINY_WNIDS] + ([words] if words.is_file() else [])
    if split == "train":
        class_files = []
        for wnid in wnids:
            folder = root / "train" / wnid / "images"
            if not folder.is_dir():
                raise LD3MError(f"Tiny-ImageNet class folder {folder} is missing (wnids.txt lists {wnid})")
            names = readers.image_names(folder)[:max_per_class]
            if not names:
                raise LD3MError(f"class folder {folder} holds no image files")
            class_files.append(ClassFiles(str(folder), names))
    else:
        # Tiny-ImageNet's test/ has no labels: the held-out split is val/, as for ImageNet.
        annotations = root / readers.TINY_VAL_ANNOTATIONS
        images = root / "val" / "images"
        if not annotations.is_file() or not images.is_dir():
            raise LD3MError(f"Tiny-ImageNet's labelled held-out split is {root / 'val'} with images/ and "
                            f"val_annotations.txt; {annotations if not annotations.is_file() else images} "
                            "is missing")
        wnid_of = readers.read_tiny_val_annotations(annotations)
        strangers = sorted(set(wnid_of.values()) - set(wnids))
        if strangers:
            raise LD3MError(f"{annotations} labels images with {strangers[0]}, which wnids.txt does not list")
        by_wnid = _group_by_label(readers.image_names(images), wnid_of.get, images, annotations)
        missing = [w for w in wnids if w not in by_wnid]
        if missing:
            raise LD3MError(f"{images} has no images of class {missing[0]} according to {annotations.name}")
        class_files = [ClassFiles(str(images), by_wnid[w][:max_per_class]) for w in wnids]
        label_files.append(annotations)
    return FileSource("tiny-imagenet", f"Tiny-ImageNet {split} {res}px", class_names, class_files, label_files)


__all__ = ["ArraySource", "ClassFiles", "DecodeOptions", "FileSource", "plan"]
