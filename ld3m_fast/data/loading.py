"""`load_dataset`: one entry point for every supported source, through an on-disk uint8 cache.

Sources (auto-detected from the folder's contents; `ld3m_fast.data.sources`):

- ImageNet tree: `root/train/<wnid>/*.JPEG`, `root/val/<wnid>/*` (wnid = n########);
  `subset=` picks one of the lists of `ld3m_fast.data.subsets` (the 10-class subsets, or
  `imagenet-1k` for all 1000 classes in ImageNet index order);
- ImageNet's flat `val/` folder (`ILSVRC2012_val_00000001.JPEG`, ...) with the devkit's
  `ILSVRC2012_validation_ground_truth.txt` + `meta.mat`, or Kaggle's `LOC_val_solution.csv`,
  in the folder or above it;
- Tiny-ImageNet: `wnids.txt`, `train/<wnid>/images/*`, `val/images/*` + `val/val_annotations.txt`;
- any ImageFolder tree: `root/<split>/<class>/*` (or `root/<class>/*` for split="train"),
  classes = subfolders in sorted order;
- CIFAR-10 python batches (`cifar-10-batches-py`) and CIFAR-100 (`cifar-100-python`: `train`,
  `test`, `meta`, fine labels), the folder or its parent;
- IDX files (MNIST layout): `train-images-idx3-ubyte[.gz]` etc.;
- the word `fashion-mnist`: Debian's `dataset-fashion-mnist` under
  /usr/share/datasets/fashion-mnist when installed, else the subset bundled with the package.

Images are decoded once (in worker processes), into a cache entry under `cache_dir` keyed
by the settings and every file read (`ld3m_fast.data.cache`), and read back memory-mapped:
an `ImageSet`'s images are a uint8 tensor over the file, so a run holds in memory only the
rows it touches. Rows are grouped by class (class 0's first), each class in file order.
"""
from __future__ import annotations

import logging
import numbers
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ld3m_fast._files import user_cache_dir
from ld3m_fast._threads import usable_cores
from ld3m_fast.data import cache, sources
from ld3m_fast.data.imageset import ImageSet
from ld3m_fast.data.subsets import resolve_subset
from ld3m_fast.errors import LD3MError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

def default_cache_dir() -> Path:
    return user_cache_dir("data")


def load_dataset(source: str | os.PathLike, *, split: str = "train", subset: str | None = None,
                 res: int, cache_dir: str | os.PathLike | None = None,
                 max_per_class: int | None = None,
                 classes: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
                 workers: int | None = None, progress: bool | None = None) -> ImageSet:
    """Read, decode (shorter side -> res, centre crop, RGB) and cache a labelled image set.

    source: a folder (see module docstring) or the word "fashion-mnist".
    split: "train", "val" or "test" ("val" and "test" both mean the held-out split).
    subset: ImageNet subset name or alias (only for ImageNet wnid trees and ImageNet's val).
    max_per_class: keep the first n images of each class (sorted file order / file order).
    classes: only these classes, a contiguous block such as `range(a, b)`, or a function of
        the number of classes that gives one (a rank's share: `comm.class_share`, see
        `ld3m_fast.distributed`): the images of the others are not opened, and labels stay
        the global class indices. None: every class. The whole set is decoded once either
        way (the cache is shared).
    workers: decoding processes (default: the cores this process may use).
    progress: show a progress bar while decoding (None: only on a terminal).
    Returns an `ImageSet` with images (N, 3, res, res) uint8, memory-mapped from the cache,
    and labels (N,) int64, grouped by class.
    Raises `LD3MError` (one line) for anything the user can fix. Says what it decodes (INFO) or
    that it read the cache (DEBUG) through the `ld3m_fast.data` loggers.
    """
    if split not in SPLITS:
        raise LD3MError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if isinstance(res, bool) or not isinstance(res, numbers.Integral) or res < 8:
        raise LD3MError(f"resolution must be an integer >= 8, got {res!r}")
    if max_per_class is not None and max_per_class < 1:
        raise LD3MError(f"max_per_class must be >= 1, got {max_per_class}")
    if workers is not None and workers < 1:
        raise LD3MError(f"workers must be >= 1, got {workers}")
    plan = sources.plan(source, split, subset, max_per_class, res)
    held = _held_classes(classes, len(plan.class_names))
    key = cache.CacheKey({"kind": plan.kind, "split": split, "res": res, "max_per_class": max_per_class,
                          "subset": resolve_subset(subset).name if subset else None})
    plan.add_to_key(key)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = cache_root / key.entry_name()
    index = cache.read_index(folder, key.digest(), res, plan.class_names)
    if index is not None:
        logger.debug("loaded %d cached images (%s) from %s", sum(index["counts"]), plan.label, folder)
    else:
        options = sources.DecodeOptions(res, workers or usable_cores(), progress)
        index = _decode_into(folder, plan, key, options)
    return _image_set(folder, index, res, plan, held)


def _held_classes(classes, num_classes: int) -> range:
    """`classes` as a range of class indices, checked (None: all of them)."""
    if classes is None:
        return range(num_classes)
    if callable(classes):
        classes = classes(num_classes)
    wanted = [int(k) for k in classes]
    if not wanted or wanted != list(range(wanted[0], wanted[0] + len(wanted))):
        raise LD3MError(f"classes must be a non-empty contiguous block of class indices (as "
                        f"ld3m_fast.distributed.class_share gives), got {list(classes)[:8]}")
    if wanted[0] < 0 or wanted[-1] >= num_classes:
        raise LD3MError(f"classes {wanted[0]}..{wanted[-1]} are outside the data's {num_classes} classes "
                        f"(0..{num_classes - 1})")
    return range(wanted[0], wanted[-1] + 1)


def _decode_into(folder: Path, plan, key: cache.CacheKey, options: sources.DecodeOptions) -> dict:
    """Decode what the cache entry lacks (under its lock) and return its index."""
    started = time.perf_counter()
    with cache.writer_lock(folder):
        # Another process may have finished the entry while this one waited for the lock.
        index = cache.read_index(folder, key.digest(), options.res, plan.class_names)
        if index is not None:
            return index
        writer = cache.BlockWriter(folder, key.digest(), options.res)
        try:
            plan.fill(writer, options)
        except LD3MError:
            writer.abandon()  # the data must change before this key can be completed
            raise
        except BaseException:
            writer.close()  # interrupted: the finished classes stay for the next attempt
            raise
        index = writer.finish({"class_names": list(plan.class_names), "description": plan.label})
    logger.info("decoded %d images (%s) in %.1fs; cached at %s", sum(index["counts"]), plan.label,
                time.perf_counter() - started, folder)
    legacy = folder.parent / key.entry_name(cache.LEGACY_FORMAT)
    if legacy.is_file():
        legacy.unlink()
        logger.info("removed %s: the same data in the previous cache format, which is no longer read", legacy)
    return index


def _image_set(folder: Path, index: dict, res: int, plan, held: range) -> ImageSet:
    counts = index["counts"]
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    rows = cache.open_rows(folder, res, starts[held.start], starts[held.stop])
    labels = torch.repeat_interleave(torch.arange(held.start, held.stop),
                                     torch.tensor(counts[held.start:held.stop]))
    skipped = sum(entry["count"] for entry in index["skipped"])
    if skipped:
        logger.info("%d unreadable image(s) were left out when %s was decoded", skipped, folder)
    whole = held == range(len(counts))
    description = plan.label if whole else f"{plan.label}, classes {held.start}-{held.stop - 1}"
    reader = cache.RowFile(folder / cache.DATA, res, starts[held.start], len(labels))
    return ImageSet(torch.from_numpy(rows), labels, list(plan.class_names), description=description,
                    classes=None if whole else held, rows=reader)
