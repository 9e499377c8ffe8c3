"""The decoded-data cache: uint8 rows on disk, one block per class, memory-mapped.

One entry is a folder `<cache_dir>/<kind>-<split>-<res>px-<digest>/`:

    images.u8      the rows (N, 3, res, res) uint8 in C order: class 0's block, then class 1's, ...
    index.json     what they are: the key, res, class names, rows per class, skipped files

While it is written, the rows go to `images.u8.partial` and `progress.json` records the
classes finished so far (rows per class), after their bytes are flushed to disk. A
killed decode resumes from there: the partial file is cut back to the finished classes
(a class half-written is decoded again) and decoding goes on with the next class. At the
end the partial file is renamed into place. `.lock` (an flock) keeps two processes from
writing one entry; readers of a finished entry take no lock and need no write access.

The digest covers the settings (kind, split, subset, res, max_per_class) and every file
read (path, size, mtime), so an edited data folder gets a new entry. `CacheKey` also
computes the name the same data had in the previous format (one uncompressed `.npz` of
the whole set, format 1), so that file is removed once the new entry is complete: the old
format is rebuilt, not read.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ld3m_fast._files import write_json_atomic
from ld3m_fast.errors import LD3MError

logger = logging.getLogger(__name__)

FORMAT = 2
LEGACY_FORMAT = 1
DATA, PARTIAL, INDEX, PROGRESS, LOCK = "images.u8", "images.u8.partial", "index.json", "progress.json", ".lock"
REASONS_KEPT = 10  # skipped files named per class in the index (the count is always exact)


class CacheKey:
    """Digests of the settings and the files, fed one file at a time (no list of a million paths).

    The text hashed is what format 1 hashed, `json.dumps({"files": [[path, size, mtime_ns],
    ...], **settings, "version": v}, sort_keys=True)`, for v = 2 (this format) and v = 1
    (the old `.npz` name).
    """

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self._digests = {FORMAT: hashlib.sha256(b'{"files": ['), LEGACY_FORMAT: hashlib.sha256(b'{"files": [')}
        self._files = 0

    def add_file(self, path: str | os.PathLike) -> None:
        stat = os.stat(path)
        item = json.dumps([str(path), stat.st_size, stat.st_mtime_ns])
        text = (item if self._files == 0 else ", " + item).encode()
        for digest in self._digests.values():
            digest.update(text)
        self._files += 1

    def digest(self, version: int = FORMAT) -> str:
        rest = json.dumps({**self.settings, "version": version}, sort_keys=True, default=str)
        digest = self._digests[version].copy()
        digest.update(("], " + rest[1:]).encode())
        return digest.hexdigest()

    def entry_name(self, version: int = FORMAT) -> str:
        s = self.settings
        name = f"{s['kind']}-{s['split']}-{s['res']}px-{self.digest(version)[:20]}"
        return name if version == FORMAT else name + ".npz"


def row_bytes(res: int) -> int:
    return 3 * res * res


def read_index(folder: Path, key: str, res: int, class_names: list[str]) -> dict | None:
    """The finished entry's index, or None when there is none. An entry whose files disagree
    with each other or with this key is ignored with a warning (it is then decoded again)."""
    index_path, data_path = folder / INDEX, folder / DATA
    if not index_path.is_file() or not data_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text())
        counts = index["counts"]
        problems = [what for what, bad in (
            ("format", index.get("format") != FORMAT), ("key", index.get("key") != key),
            ("resolution", index.get("res") != res), ("class names", index.get("class_names") != list(class_names)),
            ("rows per class", not isinstance(counts, list) or len(counts) != len(class_names)
             or not all(isinstance(c, int) and c > 0 for c in counts))) if bad]
        if not problems and data_path.stat().st_size != sum(counts) * row_bytes(res):
            problems.append(f"{DATA} holds {data_path.stat().st_size} bytes, expected {sum(counts) * row_bytes(res)}")
        if problems:
            raise ValueError(f"unexpected {', '.join(problems)}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("ignoring unreadable data cache %s (%s); decoding again", folder, error)
        return None
    return index


def open_rows(folder: Path, res: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a finished entry as a (stop - start, 3, res, res) uint8 memmap.

    Copy-on-write mapping: pages are read from the file when touched (never all at once),
    and writing into the array changes this process's copy, not the cache.
    """
    return np.memmap(folder / DATA, dtype=np.uint8, mode="c", offset=start * row_bytes(res),
                     shape=(stop - start, 3, res, res))


class RowFile:
    """Rows [start, start + count) of a finished entry, read on demand with `pread`.

    `rows[index]` (index: int64 tensor or list) -> (len(index), 3, res, res) uint8 tensor,
    the same bytes as indexing the memory map. Nothing is mapped, so the rows a run reads
    leave no pages in its resident set: a map keeps every page it touched mapped, in whole
    page-cache folios (measured on ext4, Linux 6.18: 0.5-2 MB per 48 KB row touched), which
    over a long run adds up to the whole file.
    """

    dtype = torch.uint8

    def __init__(self, path: Path, res: int, start: int, count: int):
        self.path, self.res, self.start, self.count = Path(path), res, start, count
        self._fd: int | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, 3, self.res, self.res)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index) -> torch.Tensor:
        positions = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.count):
            raise IndexError(f"row index out of range 0..{self.count - 1}")
        out = torch.empty((positions.numel(), 3, self.res, self.res), dtype=torch.uint8)
        if not positions.numel():
            return out
        size = row_bytes(self.res)
        buffer = memoryview(out.numpy()).cast("B")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        for i, row in enumerate(positions.tolist()):
            got = os.preadv(self._fd, [buffer[i * size:(i + 1) * size]], (self.start + row) * size)
            if got != size:
                raise LD3MError(f"data cache {self.path} was cut short while in use: delete it and run again")
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


@contextmanager
def writer_lock(folder: Path):
    """Hold the entry's flock while writing it (the OS drops it when a process dies)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a")
    except OSError as error:
        raise LD3MError(f"cannot write the data cache in {folder.parent} ({error.strerror or error}): pass "
                        "--cache-dir DIR on a writable disk (or set LD3M_FAST_CACHE)") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is decoding into %s", folder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class BlockWriter:
    """Appends class blocks to an entry's partial file and records each finished class.

    Opened under `writer_lock`. `done_classes` classes are already on disk (from a killed
    earlier decode with the same key); the caller appends rows for the next class with
    `append` and closes it with `end_class`, then calls `finish`.
    """

    def __init__(self, folder: Path, key: str, res: int):
        self.folder, self.key, self.res = folder, key, res
        for stale in (INDEX, DATA):  # a finished-looking entry that `read_index` refused
            (folder / stale).unlink(missing_ok=True)
        self.counts, self.skipped = self._recorded_progress()
        done_bytes = sum(self.counts) * row_bytes(res)
        partial = folder / PARTIAL
        if not self.counts or not partial.is_file() or partial.stat().st_size < done_bytes:
            self.counts, self.skipped, done_bytes = [], [], 0
        self._file = open(partial, "r+b" if done_bytes else "wb")
        self._file.truncate(done_bytes)  # drops a class that was half-written
        self._file.seek(done_bytes)
        self.class_rows = 0

    def _recorded_progress(self) -> tuple[list[int], list[dict]]:
        try:
            progress = json.loads((self.folder / PROGRESS).read_text())
            if progress.get("key") == self.key and progress.get("res") == self.res:
                return list(progress["counts"]), list(progress["skipped"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return [], []

    @property
    def done_classes(self) -> int:
        return len(self.counts)

    def append(self, rows: np.ndarray) -> None:
        """rows: (n, 3, res, res) uint8 of the class being written."""
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).data)
        self.class_rows += len(rows)

    def end_class(self, skipped: list[str]) -> None:
        """The current class is complete: make its bytes durable, then record it."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.counts.append(self.class_rows)
        self.skipped.append({"count": len(skipped), "files": skipped[:REASONS_KEPT]})
        self.class_rows = 0
        write_json_atomic(self.folder / PROGRESS, {"format": FORMAT, "key": self.key, "res": self.res,
                                                   "counts": self.counts, "skipped": self.skipped})

    def finish(self, description: dict) -> dict:
        """Publish the entry: index first, then the rows under their final name."""
        self._file.close()
        index = {"format": FORMAT, "key": self.key, "res": self.res, **description,
                 "counts": self.counts, "skipped": self.skipped}
        write_json_atomic(self.folder / INDEX, index)
        os.replace(self.folder / PARTIAL, self.folder / DATA)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        return index

    def abandon(self) -> None:
        """Drop the partial entry (its key cannot be completed: the data must change first)."""
        self._file.close()
        for name in (PARTIAL, PROGRESS):
            (self.folder / name).unlink(missing_ok=True)

    def close(self) -> None:
        self._file.close()


__all__ = ["BlockWriter", "CacheKey", "FORMAT", "RowFile", "open_rows", "read_index", "row_bytes", "writer_lock"]
