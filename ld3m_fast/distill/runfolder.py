"""The run folder as a thing one process owns: its lock, its identity, its leftovers.

- **Lock.** A run folder is held by one process at a time through an `fcntl.flock` on
  `RUN/.lock`. The operating system drops the lock when the process ends, however it
  ends (kill -9 included), so a lock is never stale; the file names the holder's pid.
- **Identity.** `RUN/run.json` holds a random run id made when the run starts. Every
  checkpoint carries it, so a checkpoint copied in from another run (another seed,
  same shapes) is refused instead of silently continuing the wrong run.
- **Leftovers.** Atomic writes go through temporary files and folders (`ld3m_fast._files`);
  one a kill cut short is removed when the run is resumed.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from .._files import TEMP_PREFIX, write_text_atomic
from ..errors import LD3MError

LOCK = ".lock"
IDENTITY = "run.json"


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until `release()` or exit."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self._fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise LD3MError(f"cannot write to run folder {self.path.parent} ({error.strerror}); "
                            "choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LD3MError(f"{self.path.parent} is in use by another ld3m-fast process{holder}; "
                            "wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {holder['pid']} on {holder['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def is_empty(run_dir) -> bool:
    """True when `run_dir` holds nothing but (perhaps) its lock file."""
    return all(p.name == LOCK for p in Path(run_dir).iterdir())


def new_run_id() -> str:
    return uuid.uuid4().hex


def create_identity(run_dir) -> str:
    """Write `run.json` with a new run id; returns the id."""
    from .._version import __version__

    run_id = new_run_id()
    write_text_atomic(Path(run_dir) / IDENTITY, json.dumps(
        {"run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "ld3m_fast": __version__}, indent=2) + "\n")
    return run_id


def read_identity(run_dir) -> str:
    path = Path(run_dir) / IDENTITY
    try:
        return str(json.loads(path.read_text())["run_id"])
    except FileNotFoundError:
        raise LD3MError(f"{run_dir} has no {IDENTITY}: it was not started by this version of "
                        "ld3m-fast and cannot be resumed; start a new run") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LD3MError(f"cannot read {path} ({error}); the run cannot be resumed") from None


def remove_leftovers(run_dir) -> list[Path]:
    """Delete the temporary files and folders (an export's) of atomic writes a kill interrupted;
    returns what was removed."""
    import shutil

    removed = []
    for path in sorted(Path(run_dir).rglob(f"{TEMP_PREFIX}*")):
        if any(TEMP_PREFIX in part for part in path.relative_to(run_dir).parts[:-1]):
            continue  # inside a temporary folder removed whole
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
