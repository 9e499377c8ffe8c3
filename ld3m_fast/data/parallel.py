"""Decode image files in worker processes, results in input order, memory bounded.

Pillow releases the GIL inside its C decoder and resampler, but not for the Python
around each file (open, draft, mode conversion, crop, the copy into the batch), so
the work goes to processes. They are started with "spawn" (forking a process that
already runs torch's OpenMP threads can deadlock), import only `ld3m_fast.data.decode`
(Pillow and numpy, no torch) and ignore Ctrl-C: the caller stops them.

Memory: at most `IN_FLIGHT_PER_WORKER` chunks per worker are submitted and not yet
consumed, and a chunk holds about `CHUNK_BYTES` of decoded pixels, so what the caller
holds at once does not depend on how many images there are.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

import numpy as np

from ld3m_fast.data import decode
from ld3m_fast.errors import LD3MError

CHUNK_BYTES = 4 << 20
IN_FLIGHT_PER_WORKER = 2
# Below this many images per worker a process's start-up (an interpreter, numpy, Pillow:
# ~0.2 s) costs more than it saves; small sets are decoded in the calling process.
MIN_IMAGES_PER_WORKER = 64


def chunk_rows(res: int) -> int:
    """Images per chunk: about `CHUNK_BYTES` of decoded (3, res, res) uint8 rows."""
    return max(1, CHUNK_BYTES // (3 * res * res))


def worker_count(images: int, requested: int) -> int:
    """Worker processes worth starting for `images` files (1: decode in this process)."""
    workers = max(1, min(requested, math.ceil(images / MIN_IMAGES_PER_WORKER)))
    return workers if workers == 1 or _workers_can_start() else 1


def _workers_can_start() -> bool:
    """Whether spawned workers can import this process's main module: they run it again by
    its path, which a script read from stdin (`python -`) does not have."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return getattr(main, "__spec__", None) is not None or path is None or os.path.isfile(path)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    pending = deque()
    upcoming = iter(jobs)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_interrupts)

    def submit_next() -> bool:
        job = next(upcoming, None)
        if job is not None:
            pending.append((job, pool.submit(decode.decode_files, job[1], res)))
        return job is not None

    try:
        while len(pending) < workers * IN_FLIGHT_PER_WORKER and submit_next():
            pass
        while pending:
            (tag, paths), future = pending.popleft()
            try:
                rows, failures = future.result()
            except BrokenProcessPool:
                raise LD3MError("a decoding worker process died (killed, out of memory, or a main script "
                                "without `if __name__ == \"__main__\":`); run again to continue from the "
                                "classes already decoded") from None
            submit_next()
            yield tag, paths, rows, failures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["CHUNK_BYTES", "MIN_IMAGES_PER_WORKER", "chunk_rows", "decode_in_order", "worker_count"]
