"""Atomic file writes: a temporary file beside the target, then a rename.

A run killed at any moment leaves either the old file or the new one, never half
of one. Temporary files are created private (mode 0600) and named
`TEMP_PREFIX<name>.<random><suffix>` beside the target, so a resumed run can find and
remove the ones a kill left behind; the finished file gets the usual permissions
(0666 minus the umask), as a plain `open` would give it. `user_cache_dir` says where
the caches live.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".ld3m-partial."


def user_cache_dir(kind: str) -> Path:
    """`$LD3M_FAST_CACHE/<kind>`, by default `~/.cache/ld3m_fast/<kind>` (e.g. data, planner)."""
    return Path(os.environ.get("LD3M_FAST_CACHE", "~/.cache/ld3m_fast")).expanduser() / kind


def check_writable_file(path, flag: str, *, exists_ok: bool = True) -> Path:
    """Check now, before any work, that `path` can be written as a file (its folder exists or can
    be made, and takes a file); one line naming `flag` otherwise (an `LD3MError`)."""
    from .errors import LD3MError

    path = Path(path)
    shown = repr(str(path))  # quotes and escapes: a path with a newline stays one line
    if path.is_dir():
        raise LD3MError(f"{flag} {shown} is a folder; give a file path")
    if path.exists() and not exists_ok:
        raise LD3MError(f"{flag} {shown} already exists; choose another path or remove it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders to make are made at write time
        folder = folder.parent
    if not folder.is_dir():
        raise LD3MError(f"cannot write {flag} {shown}: {str(folder)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise LD3MError(f"cannot write {flag} {shown} ({error.strerror or error}); choose a writable path") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path, suffix: str = ""):
    """Yield a temporary path beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_tensors_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors file of CPU copies of `tensors`; metadata values become strings."""
    from safetensors.torch import save_file

    with atomic_write(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
