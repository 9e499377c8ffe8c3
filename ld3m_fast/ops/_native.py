"""The optional C++ extension: ahead-of-time `ld3m_fast._C`, else a just-in-time build.

Order of preference:
1. `ld3m_fast._C`, built by `setup.py` during `pip install --no-build-isolation -e .`, if it
   was compiled from the C++ sources now in `csrc_dir()`: it carries their `source_hash()`, and
   after a `git pull` that changed csrc/ it is stale and ignored (never run);
2. a just-in-time build of those sources with `torch.utils.cpp_extension.load` into
   `build_dir()`, a cache folder keyed to everything that is compiled (see `build_key`), so it
   compiles once (~1 min) per source tree and change, and two checkouts never share a build;
3. nothing: the ops fall back to the PyTorch reference with one warning.

Builds never hang on a dead process: a build holds an `fcntl.flock` on `build.flock` in its
folder, which the kernel drops when the holder dies (even on kill -9). A process that gets
that lock and finds no finished build clears the folder first, so a torch `lock` file left by a
killed build is removed instead of waited on forever; a process that finds another one
building waits for it, saying so in one line. A first build says so before and after (INFO on
this module's logger, under `ld3m_fast`); `ensure_extension` lets a run do it during set-up.

Set `LD3M_FAST_JIT=0` to forbid the just-in-time build (then only 1 or 3), and
`LD3M_FAST_VERBOSE_BUILD=1` to see the compiler's output.

setup.py loads this file by path for the flags and the source hash: keep it importable on
its own (the standard library and torch at the top, no relative imports).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
SOURCE_HASH_MACRO = "LD3M_FAST_SOURCE_HASH"  # bindings.cpp exposes it as `source_hash`
# How to build it ahead of time, from the repository root with torch installed (needs g++).
BUILD_HINT = 'pip install "setuptools>=70.1" ninja && pip install --no-build-isolation -e .'

_JIT_NAME = "ld3m_fast_C"
_AOT_NAME = "ld3m_fast._C"
_DONE = "build.json"     # written, atomically, once a build in the folder has succeeded
_FLOCK = "build.flock"   # held with fcntl.flock by the process that builds

_lock = threading.Lock()
_module: ModuleType | None = None
_module_dir: Path | None = None  # the folder the just-in-time module was loaded from
_failure: str | None = None      # why the extension is unavailable, once we know
_aot: tuple[ModuleType | None, str | None] | None = None  # (usable ld3m_fast._C, why not), once looked at
_warned = False


def csrc_dir() -> Path:
    """Folder holding the C++ sources: the installed `ld3m_fast.csrc`, else the checkout's `csrc/`."""
    try:
        from importlib.resources import files

        installed = Path(str(files("ld3m_fast.csrc")))
        if (installed / "bindings.cpp").is_file():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "csrc"


def sources(directory: str | os.PathLike | None = None) -> list[Path]:
    """The .cpp files compiled into the extension, in a fixed order."""
    return sorted(Path(directory or csrc_dir()).glob("*.cpp"))


def source_files(directory: str | os.PathLike | None = None) -> list[Path]:
    """Everything the compile reads from the source folder: the .cpp files and the headers."""
    folder = Path(directory or csrc_dir())
    return sorted([*folder.glob("*.cpp"), *folder.glob("*.h")])


def source_hash(directory: str | os.PathLike | None = None) -> str:
    """16 hex digits of SHA-256 over the names and contents of `source_files(directory)`."""
    digest = hashlib.sha256()
    for path in source_files(directory):
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def compile_flags(directory: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags) of both builds; the source hash goes in as a macro."""
    return [*CFLAGS, f"-D{SOURCE_HASH_MACRO}={source_hash(directory)}"], list(LDFLAGS)


@functools.lru_cache(maxsize=None)
def compiler_identity(compiler: str) -> str:
    """Resolved path and `--version` output of `compiler` (what torch runs: $CXX, else c++).

    Cached per process. A missing compiler gives a "not found" line, not an error.
    """
    path = shutil.which(compiler)
    if path is None:
        return f"{compiler}: not found"
    try:  # run it by its name on PATH: a ccache symlink resolves to ccache itself
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as error:
        version = f"--version failed: {error!r}"
    return f"{os.path.realpath(path)}\n{version.strip()}"


def torch_build() -> str:
    """The torch build the extension links against: version, commit, CUDA/HIP and C++ ABI."""
    return (f"{torch.__version__} git={torch.version.git_version} cuda={torch.version.cuda} "
            f"hip={torch.version.hip} cxx11_abi={torch._C._GLIBCXX_USE_CXX11_ABI}")


def python_abi() -> str:
    """The interpreter ABI an extension module is built for (e.g. .cpython-311-x86_64-linux-gnu.so)."""
    return f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}"


def build_key(directory: str | os.PathLike | None = None, *, cflags=None, ldflags=None,
              torch_version: str | None = None, compiler: str | None = None,
              python: str | None = None) -> str:
    """16 hex digits naming one just-in-time build; any argument left None is this process's own.

    Hashes the absolute source folder, the contents of its sources and headers, the compile and
    link flags, the torch build (`torch_build()`), the compiler's identity (`compiler_identity`)
    and the Python ABI. Anything that changes the compiled module changes the key.
    """
    folder = Path(directory or csrc_dir()).resolve()
    default_cflags, default_ldflags = compile_flags(folder)
    parts = {
        "source_dir": str(folder),
        "source_hash": source_hash(folder),
        "cflags": list(default_cflags if cflags is None else cflags),
        "ldflags": list(default_ldflags if ldflags is None else ldflags),
        "torch": torch_build() if torch_version is None else torch_version,
        "compiler": compiler_identity(os.environ.get("CXX", "c++")) if compiler is None else compiler,
        "python": python_abi() if python is None else python,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """`$TORCH_EXTENSIONS_DIR/ld3m_fast`, else `~/.cache/ld3m_fast/torch_extensions`."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) / "ld3m_fast" if root else Path.home() / ".cache" / "ld3m_fast" / "torch_extensions"


def build_dir(directory: str | os.PathLike | None = None) -> Path:
    """Cache folder of the just-in-time build of the sources in `directory` (default `csrc_dir()`).

    Its name ends in `build_key(directory)`, which covers the absolute source folder: two
    checkouts (or two copies of csrc/) never share, overwrite or rebuild each other's build, even
    with identical sources; editing a source, a flag, torch, the compiler or Python gives a new
    folder instead of recompiling over a build another process may be using.
    """
    version = torch.__version__.replace("+", "_")
    return cache_root() / f"{_JIT_NAME}-py{sys.version_info.major}{sys.version_info.minor}-torch{version}-" \
                          f"{build_key(directory)}"


def _jit_allowed() -> bool:
    return os.environ.get("LD3M_FAST_JIT", "1") != "0"


def _compiler_missing() -> str | None:
    """Why a just-in-time build cannot run here, or None if it can."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (install g++ or set CXX)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not sources():
        return f"C++ sources not found in {csrc_dir()}"
    return None


def _aot_state() -> tuple[ModuleType | None, str | None]:
    """(`ld3m_fast._C` if built from the current sources, else None; why it is not used, or None)."""
    global _aot
    if _aot is None:
        if importlib.util.find_spec(_AOT_NAME) is None:
            _aot = (None, None)
        else:
            try:
                module = importlib.import_module(_AOT_NAME)
            except ImportError as error:  # e.g. built against another torch
                _aot = (None, f"ahead-of-time {_AOT_NAME} does not load ({_first_line(error)}), ignored")
            else:
                built, current = getattr(module, "source_hash", None), source_hash()
                _aot = (module, None) if built == current else (None, (
                    f"stale ahead-of-time build ignored: {_AOT_NAME} was compiled from other C++ sources "
                    f"(hash {built}, csrc/ now {current}); rebuild it with `{BUILD_HINT}`"))
    return _aot


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


@contextmanager
def _build_lock(directory: Path):
    """Hold an exclusive `flock` on `directory/build.flock`; released by the OS if we die."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is all there is
        yield
        return
    with open(directory / _FLOCK, "a+") as handle:  # "a+": never truncate a holder's pid unlocked
        locked = True
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            logger.info(f"ld3m-fast: waiting for another process{f' (pid {holder})' if holder else ''} "
                        f"that is compiling the C++ CPU kernels in {directory}...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks: build unguarded rather than not at all
            logger.warning(f"cannot lock {directory / _FLOCK} ({error}); building without a lock")
            locked = False
        if locked:
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _clear(directory: Path) -> None:
    """Remove what an unfinished (killed) build left in `directory`, torch's `lock` file included."""
    for entry in directory.iterdir():
        if entry.name == _FLOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _import_built(directory: Path) -> ModuleType:
    path = directory / f"{_JIT_NAME}.so"
    spec = importlib.util.spec_from_file_location(_JIT_NAME, path)
    if spec is None or not path.is_file():
        raise ImportError(f"no {path.name} in {directory}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Unbuildable(Exception):
    """No cached build and nothing to build it with; the message says why."""


def _load_jit() -> tuple[ModuleType, Path]:
    """Load the cached just-in-time build, compiling it first (under the build lock) if needed."""
    directory = build_dir()
    if (directory / _DONE).is_file():
        try:
            return _import_built(directory), directory
        except ImportError:
            pass  # a damaged cache: rebuild it below
    missing = _compiler_missing()
    if missing is not None:
        raise _Unbuildable(missing)
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if (directory / _DONE).is_file():  # another process finished it while we waited
            try:
                return _import_built(directory), directory
            except ImportError as error:
                logger.warning(f"cached C++ build in {directory} does not load ({_first_line(error)}); "
                               "rebuilding it")
        _clear(directory)
        from torch.utils.cpp_extension import load

        from ld3m_fast._files import write_json_atomic

        logger.info(f"ld3m-fast: compiling the C++ CPU kernels (first use; cached in {directory})...")
        start = time.perf_counter()
        cflags, ldflags = compile_flags()
        module = load(
            name=_JIT_NAME,
            sources=[str(path) for path in sources()],
            extra_include_paths=[str(csrc_dir())],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            verbose=os.environ.get("LD3M_FAST_VERBOSE_BUILD", "0") == "1",
        )
        seconds = time.perf_counter() - start
        write_json_atomic(directory / _DONE, {
            "source_dir": str(csrc_dir().resolve()), "source_hash": source_hash(), "cflags": cflags,
            "ldflags": ldflags, "torch": torch_build(), "python": python_abi(),
            "compiler": compiler_identity(os.environ.get("CXX", "c++")), "seconds": round(seconds, 1)})
        logger.info(f"ld3m-fast: compiled the C++ CPU kernels in {seconds:.0f} s")
        return module, directory


def get_extension() -> ModuleType | None:
    """The loaded extension module, building it just in time if needed; None if unavailable.

    A first build, or a wait for another process's build, is logged in one line each (INFO).
    The result, success or failure, is kept for the process.
    """
    global _module, _module_dir, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        module, _ = _aot_state()
        if module is None:
            reason = None
            if not _jit_allowed():
                reason = "LD3M_FAST_JIT=0 and no usable ahead-of-time ld3m_fast._C"
            else:
                try:
                    module, _module_dir = _load_jit()
                except _Unbuildable as error:
                    reason = str(error)
                except Exception as error:  # a failed build must never break the library
                    reason = f"just-in-time build failed: {_first_line(error)}"
            _failure = reason
        _module = module
        return _module


def ensure_extension() -> str:
    """Load the C++ extension now, compiling it first if it is not built; return `status()`.

    Call it in a run's set-up, before its progress bar starts, so that a first build (about a
    minute) happens and says so there, not silently inside iteration 1: it logs
    "compiling ... (first use; cached in DIR)..." and "compiled ... in N s" (INFO).
    Never raises for a missing compiler or a failed build: the status says why.
    """
    get_extension()
    return status()


def warn_fallback_once(op_name: str) -> None:
    """Emit the single 'C++ extension missing' warning of this process."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"ld3m_fast: C++ extension unavailable ({_failure}); {op_name} and the other CPU ops use "
        f"the PyTorch reference. Build it ahead of time with `{BUILD_HINT}` (needs g++), or let it "
        "build just in time on first use (needs g++ and ninja); check with `ld3m-fast info`.",
        RuntimeWarning,
        stacklevel=3,
    )


def _with_note(line: str) -> str:
    note = _aot_state()[1]
    return f"{line}; {note}" if note else line


def status() -> str:
    """One line: loaded, built (ahead of time / cached just-in-time build), buildable, or
    `unavailable: <reason>`, plus a note when a stale ahead-of-time build is ignored. Never builds."""
    if _module is not None:
        if _module.__name__ == _AOT_NAME:
            return f"loaded (ahead-of-time {_AOT_NAME})"
        return _with_note(f"loaded (just-in-time build in {_module_dir or build_dir()})")
    if _failure is not None:
        return f"unavailable: {_failure}"
    if _aot_state()[0] is not None:
        return f"built (ahead-of-time {_AOT_NAME})"
    if not _jit_allowed():
        return _with_note("unavailable: LD3M_FAST_JIT=0 and no usable ahead-of-time ld3m_fast._C")
    directory = build_dir()
    if (directory / _DONE).is_file():
        return _with_note(f"built (just-in-time cache in {directory})")
    missing = _compiler_missing()
    if missing is not None:
        return _with_note(f"unavailable: {missing}")
    return _with_note(f"buildable (compiles just in time on first use into {directory})")


def may_be_available() -> bool:
    """True unless we already know the extension cannot be had (does not build)."""
    if _module is not None:
        return True
    if _failure is not None:
        return False
    return not status().startswith("unavailable")
