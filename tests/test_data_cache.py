"""The disk-backed data cache: one block per class, memory-mapped, resumable, keyed to the files.

Covers: a decode killed with SIGKILL resumes with the classes already written (a half-written
class is redone); the old one-file `.npz` cache is rebuilt and removed; `classes=` opens one
contiguous share with global labels; worker processes give the same rows as the calling
process; images that would need an absurd allocation (a 1 x 20,000,000 PNG) are skipped
before decoding; `RealData` keeps the memory-mapped rows and draws exactly as before.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ld3m_fast.data import cache, decode, load_dataset, parallel, require_per_class, sources
from ld3m_fast.distill.algorithms import RealData
from ld3m_fast.errors import LD3MError

from _data_helpers import CountingDecoder, logged_warnings

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path, classes=5, per_class=3, size=(12, 10)) -> Path:
    """An ImageFolder tree; image i of class k is a solid colour that encodes (k, i)."""
    for k in range(classes):
        for i in range(per_class):
            path = root / f"class{k}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (40 * k, 10 * i, 200)).save(path)
    return root


def _entry(cache_dir: Path) -> Path:
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return entry


# ----------------------------------------------------------------------------- layout, resume

def test_rows_are_class_blocks_in_one_file(tmp_path):
    root = _tree(tmp_path / "data")
    data = load_dataset(root, res=8, cache_dir=tmp_path / "c")
    entry = _entry(tmp_path / "c")
    index = json.loads((entry / "index.json").read_text())
    assert index["counts"] == [3] * 5 and index["class_names"] == [f"class{k}" for k in range(5)]
    raw = np.fromfile(entry / "images.u8", dtype=np.uint8).reshape(15, 3, 8, 8)
    assert torch.equal(data.images, torch.from_numpy(raw))
    assert data.labels.tolist() == [k for k in range(5) for _ in range(3)]
    assert data.images[4, :, 0, 0].tolist() == [40, 10, 200]  # class 1, image 1


_KILLED_DECODE = """
import sys, time
from ld3m_fast.data import decode, load_dataset
real = decode.decode_image_file
def decode_or_hang(path, res):
    if path.endswith("class2/000.png"):
        time.sleep(600)  # killed here, with classes 0 and 1 on disk
    return real(path, res)
decode.decode_image_file = decode_or_hang
load_dataset(sys.argv[1], res=8, cache_dir=sys.argv[2], workers=1)
"""


def test_decode_killed_with_sigkill_resumes_from_finished_classes(tmp_path, monkeypatch, caplog):
    root, cache_dir = _tree(tmp_path / "data"), tmp_path / "c"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_DECODE, str(root), str(cache_dir)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = list(cache_dir.glob("*/progress.json"))
            if progress and len(json.loads(progress[0].read_text())["counts"]) == 2:
                break
            assert child.poll() is None, "the decode ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("classes 0 and 1 were never recorded")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    entry = _entry(cache_dir)
    assert not (entry / "index.json").exists() and not (entry / "images.u8").exists()
    partial = entry / "images.u8.partial"
    assert partial.stat().st_size == 6 * 3 * 8 * 8
    with open(partial, "ab") as handle:  # as if the kill had come halfway through class 2
        handle.write(b"\x07" * (2 * 3 * 8 * 8))

    counter = CountingDecoder(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ld3m_fast.data"):
        resumed = load_dataset(root, res=8, cache_dir=cache_dir, workers=1)
    assert counter.calls == 9  # classes 2, 3, 4 only
    assert any("resuming after the first 2 classes" in m for m in caplog.messages)
    fresh = load_dataset(root, res=8, cache_dir=tmp_path / "fresh")
    assert torch.equal(resumed.images, fresh.images) and torch.equal(resumed.labels, fresh.labels)
    assert sorted(p.name for p in entry.iterdir()) == [".lock", "images.u8", "index.json"]


def test_interrupted_decode_keeps_finished_classes(tmp_path, monkeypatch):
    root, cache_dir = _tree(tmp_path / "data"), tmp_path / "c"
    real = decode.decode_image_file

    def interrupt_at_class3(path, res):
        if "class3" in str(path):
            raise KeyboardInterrupt
        return real(path, res)

    monkeypatch.setattr(decode, "decode_image_file", interrupt_at_class3)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(root, res=8, cache_dir=cache_dir)
    assert json.loads((_entry(cache_dir) / "progress.json").read_text())["counts"] == [3, 3, 3]
    monkeypatch.setattr(decode, "decode_image_file", real)
    counter = CountingDecoder(monkeypatch)
    load_dataset(root, res=8, cache_dir=cache_dir)
    assert counter.calls == 6


def _format1_cache_name(root: Path, res: int) -> str:
    """The file name the previous version gave this ImageFolder tree's cache (its own formula)."""
    files = sorted(p for d in sorted(root.iterdir()) for p in d.iterdir())
    fingerprint = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps({"version": 1, "kind": "imagefolder", "split": "train", "subset": None, "res": res,
                      "max_per_class": None, "files": fingerprint}, sort_keys=True, default=str)
    return f"imagefolder-train-{res}px-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def test_old_npz_cache_is_rebuilt_and_removed(tmp_path, monkeypatch, caplog):
    """Format 1 (one .npz of the whole set) is not read: the set is decoded again into the new
    format and the old file of the same data is deleted."""
    root, cache_dir = _tree(tmp_path / "data"), tmp_path / "c"
    cache_dir.mkdir()
    old = cache_dir / _format1_cache_name(root.resolve(), 8)
    np.savez(old, images=np.zeros((15, 3, 8, 8), np.uint8), labels=np.repeat(np.arange(5), 3),
             class_names=np.asarray([f"class{k}" for k in range(5)]))
    unrelated = cache_dir / "imagefolder-train-8px-00000000000000000000.npz"
    unrelated.write_bytes(b"another data set's old cache")
    counter = CountingDecoder(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ld3m_fast.data"):
        data = load_dataset(root, res=8, cache_dir=cache_dir)
    assert counter.calls == 15 and data.images[4, :, 0, 0].tolist() == [40, 10, 200]
    assert not old.exists() and unrelated.exists()
    assert any(f"removed {old}" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- one process's classes

def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """Files mapped at the address of `tensor`'s first byte (from /proc/self/maps)."""
    address, found = tensor.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) >= 6:
            found.add(fields[5])
    return found


def test_classes_open_one_contiguous_share_with_global_labels(tmp_path):
    root, cache_dir = _tree(tmp_path / "data", classes=6, per_class=2), tmp_path / "c"
    whole = load_dataset(root, res=8, cache_dir=cache_dir)
    share = load_dataset(root, res=8, cache_dir=cache_dir, classes=range(2, 5))
    assert share.labels.tolist() == [2, 2, 3, 3, 4, 4] and share.num_classes == 6
    assert share.held_classes == range(2, 5) and share.class_names == whole.class_names
    assert torch.equal(share.images, whole.images[4:10])
    assert share.class_counts() == [0, 0, 2, 2, 2, 0]
    require_per_class(share, 2)  # only the held classes count
    with pytest.raises(LD3MError, match=r"class3 \(2\)"):
        require_per_class(share, 3)
    picked = share.sample_per_class(1, torch.Generator().manual_seed(0))
    assert picked.labels.tolist() == [2, 3, 4]
    # The share is a map of its rows of the cache file, nothing more.
    rows = cache.row_bytes(8)
    assert share.images.untyped_storage().nbytes() == 6 * rows
    assert _mapped_files(share.images) == {str(_entry(cache_dir) / "images.u8")}
    real = RealData.from_imageset(share)
    assert real.images.data_ptr() == share.images.data_ptr()
    assert [len(i) for i in real.class_indices] == [0, 0, 2, 2, 2, 0]
    with pytest.raises(LD3MError, match="class 0 has no real images"):
        real.draw(0, 1, torch.Generator())
    for bad, match in ((range(4, 8), "outside the data's 6 classes"), ([1, 3], "contiguous"), ([], "contiguous")):
        with pytest.raises(LD3MError, match=match):
            load_dataset(root, res=8, cache_dir=cache_dir, classes=bad)


def test_class_share_of_distributed_matches_whole_set(tmp_path):
    from ld3m_fast.distributed import class_share

    root, cache_dir = _tree(tmp_path / "data", classes=5, per_class=2), tmp_path / "c"
    whole = load_dataset(root, res=8, cache_dir=cache_dir)
    pieces = [load_dataset(root, res=8, cache_dir=cache_dir, classes=class_share(5, 0, 2)),
              load_dataset(root, res=8, cache_dir=cache_dir,  # as `comm.class_share` is passed
                           classes=lambda num_classes: class_share(num_classes, 1, 2))]
    assert [p.held_classes for p in pieces] == [range(0, 3), range(3, 5)]
    assert torch.equal(torch.cat([p.images for p in pieces]), whole.images)
    assert torch.equal(torch.cat([p.labels for p in pieces]), whole.labels)


# ----------------------------------------------------------------------------- RealData

def test_real_data_draws_as_before_from_memory_mapped_rows(tmp_path):
    """The draw order is the one of the in-memory version: positions from `nonzero(labels == k)`,
    a `randperm` of them from the generator; the memory-mapped rows load the same pixels."""
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1, 0])
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "rows.u8"
    images.numpy().tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(12, 3, 8, 8)))
    in_memory, on_disk = RealData(images, labels, 3), RealData(mapped, labels, 3)
    for k in range(3):
        assert torch.equal(on_disk.class_indices[k], torch.nonzero(labels == k).flatten())
        generator = torch.Generator().manual_seed(k)
        pool = torch.nonzero(labels == k).flatten()
        expected = pool[torch.randperm(len(pool), generator=generator)[:3]]
        index = on_disk.draw(k, 3, torch.Generator().manual_seed(k))
        assert torch.equal(index, expected)
        assert torch.equal(on_disk.load(index, "cpu"), in_memory.load(index, "cpu"))
        assert torch.equal(on_disk.sample(k, 3, torch.Generator().manual_seed(k), "cpu"),
                           in_memory.sample(k, 3, torch.Generator().manual_seed(k), "cpu"))


# ----------------------------------------------------------------------------- workers

def test_worker_processes_give_the_same_rows(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "data", classes=3, per_class=7)
    (root / "class1" / "zz-broken.png").write_bytes(b"\x89PNG not really")
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        alone = load_dataset(root, res=8, cache_dir=tmp_path / "one", workers=1)
    monkeypatch.setattr(parallel, "MIN_IMAGES_PER_WORKER", 1)
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 3 * 8 * 8 * 2)  # 2 images per chunk: 12 chunks
    with caplog.at_level(logging.INFO, logger="ld3m_fast.data"):
        pooled = load_dataset(root, res=8, cache_dir=tmp_path / "two", workers=2)
    assert any("(2 worker processes)" in m for m in caplog.messages)
    assert torch.equal(alone.images, pooled.images) and torch.equal(alone.labels, pooled.labels)
    assert pooled.class_counts() == [7, 7, 7]
    skipped = [m for m in logged_warnings(caplog) if m.startswith("skipped 1 unreadable image")]
    assert len(skipped) == 2 and all("zz-broken.png" in m for m in skipped)


def test_worker_count_and_chunks():
    assert parallel.worker_count(10, 8) == 1  # a handful of images: no processes
    assert parallel.worker_count(64 * 3, 8) == 3 and parallel.worker_count(10**6, 8) == 8
    assert parallel.chunk_rows(256) == (4 << 20) // (3 * 256 * 256) and parallel.chunk_rows(4096) == 1


# ----------------------------------------------------------------------------- odd images, space

def _tall_png(path: Path, height=20_000_000):
    """A 1 x `height` grayscale PNG: below Pillow's bomb limit (89.5 M pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (1, height), 128).save(path, compress_level=1)


def test_tall_png_is_skipped_before_decoding(tmp_path, caplog):
    root = _tree(tmp_path / "data", classes=2, per_class=1)
    _tall_png(root / "class0" / "tall.png")
    assert decode.decode_allocation(1, 20_000_000, 8) > decode.MAX_DECODE_BYTES
    with caplog.at_level(logging.WARNING, logger="ld3m_fast.data"):
        data = load_dataset(root, res=8, cache_dir=tmp_path / "c")
    assert data.class_counts() == [1, 1]
    (message,) = logged_warnings(caplog)
    assert "skipped 1 unreadable image(s)" in message and "tall.png" in message
    assert "1x20000000 pixels would need 3.6 GiB" in message and "\n" not in message


def test_class_of_only_odd_images_is_one_error(tmp_path):
    root = _tree(tmp_path / "data", classes=1, per_class=1)
    _tall_png(root / "wide" / "tall.png")
    with pytest.raises(LD3MError, match=r"no readable images for class\(es\) wide \(e.g. tall.png: ValueError: "
                                        r"1x20000000 pixels would need") as caught:
        load_dataset(root, res=8, cache_dir=tmp_path / "c")
    assert "\n" not in str(caught.value)
    assert not list((tmp_path / "c").glob("*/*.partial"))  # nothing half-written kept


def test_not_enough_disk_space_is_one_error(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data")

    class Full:
        free = 1000

    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: Full)
    with pytest.raises(LD3MError, match=r"needs 0.00 GB but .* has 0.00 GB free: pass --cache-dir"):
        load_dataset(root, res=8, cache_dir=tmp_path / "c")


def test_unwritable_cache_dir_is_one_error(tmp_path):
    root = _tree(tmp_path / "data")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(LD3MError, match="cannot write the data cache in .*a-file.*pass --cache-dir"):
        load_dataset(root, res=8, cache_dir=tmp_path / "a-file" / "cache")


def test_finished_cache_is_read_without_the_writers_lock(tmp_path):
    root, cache_dir = _tree(tmp_path / "data"), tmp_path / "c"
    first = load_dataset(root, res=8, cache_dir=cache_dir)
    entry = _entry(cache_dir)
    (entry / ".lock").unlink()
    os.chmod(entry, 0o555)  # read-only for other users; root (CI) writes anyway, hence the lock check
    try:
        again = load_dataset(root, res=8, cache_dir=cache_dir)
    finally:
        os.chmod(entry, 0o755)
    assert torch.equal(first.images, again.images) and not (entry / ".lock").exists()


def test_row_file_reads_what_the_map_holds(tmp_path):
    root = _tree(tmp_path / "data", classes=4, per_class=3)
    share = load_dataset(root, res=8, cache_dir=tmp_path / "c", classes=range(1, 3))
    index = torch.tensor([5, 0, 3, 3])
    assert share.rows.shape == (6, 3, 8, 8) and len(share.rows) == 6
    assert torch.equal(share.rows[index], share.images[index]) and torch.equal(share.take(index), share.images[index])
    assert share.rows[[]].shape == (0, 3, 8, 8)
    with pytest.raises(IndexError):
        share.rows[torch.tensor([6])]
    reloaded = pickle.loads(pickle.dumps(share.rows))
    assert torch.equal(reloaded[index], share.images[index])
    real, mapped = RealData.from_imageset(share), RealData(share.images, share.labels, share.num_classes)
    assert real.rows is share.rows and mapped.rows is None
    for k in (1, 2):
        assert torch.equal(real.sample(k, 2, torch.Generator().manual_seed(k), "cpu"),
                           mapped.sample(k, 2, torch.Generator().manual_seed(k), "cpu"))


_LOADS_AT_IMPORT = """
import logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
from ld3m_fast.data import load_dataset
print("script starts")
data = load_dataset({root!r}, res=8, cache_dir={cache!r}, workers=2)
print("loaded", len(data))
"""


def test_decoding_workers_do_not_run_the_main_script(tmp_path):
    """Workers are fresh interpreters, not multiprocessing children: a script without
    `if __name__ == "__main__":` runs once, and a script read from stdin works."""
    root = _tree(tmp_path / "data", classes=2, per_class=70)
    script = tmp_path / "unguarded.py"
    script.write_text(_LOADS_AT_IMPORT.format(root=str(root), cache=str(tmp_path / "c1")))
    from_file = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    from_stdin = subprocess.run([sys.executable, "-"], input=_LOADS_AT_IMPORT.format(
        root=str(root), cache=str(tmp_path / "c2")), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    for done in (from_file, from_stdin):
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("script starts") == 1 and "(2 worker processes)" in done.stdout
        assert "loaded 140" in done.stdout


def test_a_worker_that_dies_is_one_error(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data", classes=2, per_class=70)
    real_send = parallel._Worker.send

    def send_then_kill(worker, job_id, paths, res):
        real_send(worker, job_id, paths, res)
        if job_id == 1:
            worker.process.kill()

    monkeypatch.setattr(parallel._Worker, "send", send_then_kill)
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 3 * 8 * 8 * 10)
    with pytest.raises(LD3MError, match="a decoding worker process died .*run again to continue"):
        load_dataset(root, res=8, cache_dir=tmp_path / "c", workers=2)
    assert not list((tmp_path / "c").glob("*/index.json"))
