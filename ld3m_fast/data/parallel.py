"""Decode image files in worker processes, results in input order, memory bounded.

Pillow releases the GIL inside its C decoder and resampler, but not for the Python
around each file (open, draft, mode conversion, crop, the copy into the batch), so the
work goes to processes. Each worker is a fresh `python -m ld3m_fast.data.parallel` that
imports Pillow and numpy (not torch) and decodes the chunks it is sent over a pipe.
Not multiprocessing: a forked copy of a process that already runs torch's OpenMP threads
can deadlock, and spawned children run the caller's main script again (an unguarded
script would redo its work in every worker, a script read from stdin cannot be run).

Memory: each worker has one chunk at a time, and at most `IN_FLIGHT_PER_WORKER` chunks
per worker are in flight or decoded and waiting for their turn; a chunk holds about
`CHUNK_BYTES` of decoded pixels. What the caller holds does not depend on how many images
there are.
"""
from __future__ import annotations

import math
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from ld3m_fast.data import decode
from ld3m_fast.errors import LD3MError

CHUNK_BYTES = 4 << 20
IN_FLIGHT_PER_WORKER = 2
# Below this many images per worker a worker's start-up (an interpreter, numpy, Pillow:
# about 0.2 s, some 60 decodes of an ImageNet JPEG) costs more than it saves; small sets
# are decoded in the calling process.
MIN_IMAGES_PER_WORKER = 64
_LENGTH = struct.Struct("<Q")
_DIED = ("a decoding worker process died (killed, or out of memory); run again to continue from the "
         "classes already decoded")


def chunk_rows(res: int) -> int:
    """Images per chunk: about `CHUNK_BYTES` of decoded (3, res, res) uint8 rows."""
    return max(1, CHUNK_BYTES // (3 * res * res))


def worker_count(images: int, requested: int) -> int:
    """Worker processes worth starting for `images` files (1: decode in this process)."""
    workers = max(1, min(requested, math.ceil(images / MIN_IMAGES_PER_WORKER)))
    return workers if sys.executable else 1  # an embedded interpreter has no python to start


# ----------------------------------------------------------------------------- framing

def _send(stream: BinaryIO, value) -> None:
    payload = pickle.dumps(value, protocol=5)
    stream.write(_LENGTH.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _receive(stream: BinaryIO):
    """The next value, or None at the end of the stream."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)  # written by our own worker or parent, never by a user file


# ----------------------------------------------------------------------------- the pool

class _Worker:
    def __init__(self):
        package_parent = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                           if p)}
        self.process = subprocess.Popen([sys.executable, "-m", "ld3m_fast.data.parallel"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.job: int | None = None

    def send(self, job_id: int, paths: list[str], res: int) -> None:
        self.job = job_id
        try:
            _send(self.process.stdin, (paths, res))
        except OSError:
            raise LD3MError(_DIED) from None

    def receive(self):
        # A worker sends one result per job and nothing else, so the reader never buffers
        # bytes of a later result that `select` would not see.
        result = _receive(self.process.stdout)
        if result is None:
            raise LD3MError(_DIED)
        self.job = None
        return result

    def stop(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def decode_in_order(jobs: Iterable[tuple[object, list[str]]], res: int, workers: int
                    ) -> Iterator[tuple[object, list[str], np.ndarray, list[tuple[int, str]]]]:
    """For every (tag, paths) job, in the order given: (tag, paths, rows, failures) of
    `decode.decode_files(paths, res)`. Jobs are drawn from the iterable as workers free up.

    workers <= 1 decodes in this process. A worker that dies (killed, out of memory) is one
    `LD3MError`; the results already yielded stay valid. Close the iterator (or exhaust it)
    to stop the workers.
    """
    if workers <= 1:
        for tag, paths in jobs:
            yield (tag, paths, *decode.decode_files(paths, res))
        return
    upcoming = iter(jobs)
    pool = [_Worker() for _ in range(workers)]
    selector = selectors.DefaultSelector()
    for worker in pool:
        selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
    meta: dict[int, tuple[object, list[str]]] = {}
    done: dict[int, tuple] = {}
    issued = yielded = 0
    exhausted = False
    try:
        while True:
            for worker in pool:  # give every idle worker a job while the window allows
                if worker.job is None and not exhausted and issued - yielded < workers * IN_FLIGHT_PER_WORKER:
                    job = next(upcoming, None)
                    if job is None:
                        exhausted = True
                        break
                    meta[issued] = job
                    worker.send(issued, job[1], res)
                    issued += 1
            while yielded in done:
                tag, paths = meta.pop(yielded)
                rows, failures = done.pop(yielded)
                yielded += 1
                yield tag, paths, rows, failures
            if exhausted and yielded == issued:
                return
            if any(worker.job is not None for worker in pool):
                for key, _ in selector.select():
                    worker = key.data
                    job_id = worker.job
                    done[job_id] = worker.receive()
    finally:
        selector.close()
        for worker in pool:
            worker.stop()


def _serve() -> None:
    """A worker: decode the chunks read from stdin, write the results to stdout, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the results
    requests = sys.stdin.buffer
    while True:
        job = _receive(requests)
        if job is None:
            return
        paths, res = job
        _send(results, decode.decode_files(paths, res))


if __name__ == "__main__":
    _serve()


__all__ = ["CHUNK_BYTES", "MIN_IMAGES_PER_WORKER", "chunk_rows", "decode_in_order", "worker_count"]
