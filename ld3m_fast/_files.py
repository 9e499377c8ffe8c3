"""Atomic file writes (a temporary file or folder beside the target, then a rename), and the
checks of an output path made before any work.

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


def quoted_path(path) -> str:
    """A path for a one-line message: quoted, with newlines and control characters escaped."""
    return repr(str(path))


def shell_quote(text) -> str:
    """`text` quoted for a POSIX shell on one line: shlex's quoting, or bash's $'...' (whose
    escapes the shell itself decodes) when it holds control characters such as a newline."""
    import shlex

    text = str(text)
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(c if c.isprintable() and c not in "'\\" else
                          ("\\" + c if c in "'\\" else repr(c)[1:-1]) for c in text) + "'"


def _check_can_create_in(folder: Path, path: Path, flag: str, error) -> None:
    """`folder`, or the nearest ancestor that exists (where `path` would be made), takes new
    files: a probe file is made and removed there, so permissions, a read-only filesystem and
    ACLs all count, even for root."""
    while not folder.exists() and folder != folder.parent:  # the folders to make are made at write time
        folder = folder.parent
    if not folder.is_dir():
        raise error(f"cannot write {flag} {quoted_path(path)}: {quoted_path(folder)} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as failure:
        raise error(f"cannot write {flag} {quoted_path(path)} ({failure.strerror or failure}); "
                    "choose a writable path") from None


def check_writable_file(path, flag: str, *, exists_ok: bool = True, suffix: str | None = None) -> Path:
    """Check now, before any work, that `path` can be written as a file (its folder exists or can
    be made, and takes a file; with `suffix`, its name ends so); one line naming `flag` otherwise
    (an `LD3MError`). Nothing is created."""
    from .errors import LD3MError

    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise LD3MError(f"{flag} {quoted_path(path)}: give a {suffix} file name")
    if path.is_dir():
        raise LD3MError(f"{flag} {quoted_path(path)} is a folder; give a file path")
    if path.exists() and not exists_ok:
        raise LD3MError(f"{flag} {quoted_path(path)} already exists; choose another path or remove it")
    _check_can_create_in(path.parent, path, flag, LD3MError)
    return path


def check_writable_folder(path, flag: str, *, if_not_empty: str | None = None, error=None) -> Path:
    """Check now, before any work, that `path` can be written as a folder: not a file, and it
    exists and takes files, or can be made. `if_not_empty`: what to do about an existing
    folder that holds something (it is refused then, saying so); None lets it be. One line
    naming `flag` otherwise (`error`, an `LD3MError` by default). Nothing is created."""
    from .errors import LD3MError

    error = error or LD3MError
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {quoted_path(path)} exists and is not a folder")
    if if_not_empty is not None and path.is_dir() and any(path.iterdir()):
        raise error(f"{flag} {quoted_path(path)} exists and is not empty; {if_not_empty}")
    _check_can_create_in(path, path, flag, error)
    return path


@contextmanager
def reported_write(what: str, then: str = ""):
    """A failed write inside (a full disk, a read-only filesystem, permissions) becomes one line
    naming `what` (an `LD3MError`); `then` says what is safe or what to do."""
    from .errors import LD3MError

    try:
        yield
    except OSError as error:
        raise LD3MError(f"cannot write {what} ({error.strerror or error})" + (f"; {then}" if then else "")) from None


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


def replace_folder(new: Path, path: Path) -> None:
    """Move the finished folder `new` to `path`; an old `path` is moved aside first (under a
    temporary name, which a resume clears if a kill comes between) and removed only afterwards."""
    import shutil

    old = None
    if path.exists():
        old = path.with_name(f"{TEMP_PREFIX}{path.name}.old-{new.name}")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; when the block succeeds it replaces `path`
    (`replace_folder`), so a failure (a full disk) leaves the old folder or none, never half."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_tensors_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors file of CPU copies of `tensors`; metadata values become strings."""
    with atomic_write(path, suffix=".safetensors") as tmp:
        save_tensors(tensors, tmp, metadata)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """`save_tensors_atomic` without the temporary file (for callers that rename themselves)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path,
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    except SafetensorError as error:  # its I/O failures (a full disk) as the OSError they are
        raise os_error(error) from None


def os_error(error: Exception) -> OSError:
    """safetensors' 'Error while serializing: I/O error: No space left on device (os error 28)'
    as OSError(ENOSPC, ...), so that one handler serves every write; EIO when it names no code."""
    import errno
    import re

    code = re.search(r"\(os error (\d+)\)", str(error))
    number = int(code.group(1)) if code else errno.EIO
    return OSError(number, os.strerror(number) if code else str(error))
