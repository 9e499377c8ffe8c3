"""The optional C++ extension: ahead-of-time `ld3m_fast._C`, else a just-in-time build.

Order of preference:
1. `ld3m_fast._C`, built by `setup.py` (`pip install --no-build-isolation -e .`);
2. a just-in-time build of the shipped `ld3m_fast.csrc` sources with
   `torch.utils.cpp_extension.load`, cached under `$TORCH_EXTENSIONS_DIR/ld3m_fast`
   (default `~/.cache/ld3m_fast/torch_extensions`), so it compiles once (~1 min)
   per machine, torch version and source change;
3. nothing: the ops fall back to the PyTorch reference with one warning.

Set `LD3M_FAST_JIT=0` to forbid the just-in-time build (then only 1 or 3).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_JIT_NAME = "ld3m_fast_C"
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # why the extension is unavailable, once we know
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


def sources() -> list[Path]:
    """The .cpp files compiled into the extension, in a fixed order."""
    return sorted(csrc_dir().glob("*.cpp"))


def build_dir() -> Path:
    """Cache folder of the just-in-time build, one per Python and torch version."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) / "ld3m_fast" if root else Path.home() / ".cache" / "ld3m_fast" / "torch_extensions"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return base / tag


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


def _import_aot() -> ModuleType | None:
    try:
        return importlib.import_module("ld3m_fast._C")
    except ImportError:
        return None


def _build_jit() -> ModuleType:
    from torch.utils.cpp_extension import load

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    return load(
        name=_JIT_NAME,
        sources=[str(path) for path in sources()],
        extra_include_paths=[str(csrc_dir())],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=os.environ.get("LD3M_FAST_VERBOSE_BUILD", "0") == "1",
    )


def get_extension() -> ModuleType | None:
    """The loaded extension module, building it just in time if needed; None if unavailable."""
    global _module, _failure
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        module = _import_aot()
        if module is None:
            reason = None if _jit_allowed() else "LD3M_FAST_JIT=0 and ld3m_fast._C is not built"
            reason = reason or _compiler_missing()
            if reason is None:
                try:
                    module = _build_jit()
                except Exception as error:  # a failed build must never break the library
                    reason = f"just-in-time build failed: {str(error).splitlines()[0] if str(error) else error!r}"
            _failure = reason
        _module = module
        return _module


def warn_fallback_once(op_name: str) -> None:
    """Emit the single 'C++ extension missing' warning of this process."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"ld3m_fast: C++ extension unavailable ({_failure}); {op_name} and the other CPU ops use "
        "the PyTorch reference. Build it with `LD3M_FAST_BUILD_EXT=1 pip install "
        "--no-build-isolation -e .` or let it build just in time (needs g++ and ninja); "
        "check with `ld3m-fast info`.",
        RuntimeWarning,
        stacklevel=3,
    )


def status() -> str:
    """One line saying whether the extension is built, buildable, or why not. Never builds."""
    if _module is not None:
        return "loaded (ahead-of-time ld3m_fast._C)" if _module.__name__ == "ld3m_fast._C" else \
            f"loaded (just-in-time build in {build_dir()})"
    if _failure is not None:
        return f"unavailable: {_failure}"
    if importlib.util.find_spec("ld3m_fast._C") is not None:
        return "built (ahead-of-time ld3m_fast._C)"
    if not _jit_allowed():
        return "unavailable: LD3M_FAST_JIT=0 and ld3m_fast._C is not built"
    if any(build_dir().glob(f"{_JIT_NAME}*.so")):
        return f"built (just-in-time cache in {build_dir()})"
    missing = _compiler_missing()
    if missing is not None:
        return f"unavailable: {missing}"
    return f"buildable (compiles just in time on first use into {build_dir()})"


def may_be_available() -> bool:
    """True unless we already know the extension cannot be had (does not build)."""
    if _module is not None:
        return True
    if _failure is not None:
        return False
    return not status().startswith("unavailable")
