"""Which implementation runs an op: the C++ extension, a Triton kernel, or the reference.

Automatic choice, per call, from the tensors' device:
    CUDA -> Triton (reference if triton is not installed, with one warning)
    CPU  -> C++ extension (reference if it is not built and cannot be built, with one warning)
    other devices, and float64 on Triton (its kernels compute in float32) -> reference
`LD3M_FAST_BACKEND=reference|cpp|triton` forces one; `triton` on CPU tensors needs the
interpreter (`TRITON_INTERPRET=1` set before triton is imported) and exists for tests.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..errors import LD3MError
from . import _native

BACKENDS = ("reference", "cpp", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ENV = "LD3M_FAST_BACKEND"
_warned_no_triton = False


def forced_backend() -> str | None:
    """The backend named by LD3M_FAST_BACKEND, or None when unset (automatic choice)."""
    value = os.environ.get(_ENV, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise LD3MError(f"{_ENV}={value!r} is not a backend; use one of {', '.join(BACKENDS)} or unset it")
    return value


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable_on(device_type: str) -> bool:
    if not triton_installed():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and triton_interpreter_on()


def load_kernels(name: str) -> ModuleType:
    """Import the Triton kernel module `ld3m_fast.kernels.<name>`.

    From an installed package it is a normal import; in a checkout that is not
    installed, `kernels/` sits next to the package and is loaded from its file.
    """
    try:
        return importlib.import_module(f"ld3m_fast.kernels.{name}")
    except ModuleNotFoundError:
        pass
    module_name = f"_ld3m_fast_kernels_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = Path(__file__).resolve().parents[2] / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or not path.is_file():
        raise LD3MError(f"Triton kernels {name!r} not found at {path}; reinstall ld3m-fast")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # triton reads the kernels' source through the module
    spec.loader.exec_module(module)
    return module


def _warn_no_triton_once(op_name: str) -> None:
    global _warned_no_triton
    if not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn(f"ld3m_fast: triton is not installed; {op_name} on CUDA uses the PyTorch "
                      "reference (pip install triton)", RuntimeWarning, stacklevel=4)


def choose(op_name: str, device_type: str, dtype: torch.dtype) -> str:
    """Backend for one call of `op_name` on tensors of `device_type` and `dtype`."""
    forced = forced_backend()
    if forced == "reference":
        return "reference"
    if forced == "cpp":
        if device_type != "cpu":
            raise LD3MError(f"{_ENV}=cpp runs CPU tensors only, got {device_type}; unset it or use triton")
        if _native.get_extension() is None:
            raise LD3MError(f"{_ENV}=cpp but the C++ extension is unavailable ({_native.status()}); "
                            f"build it with `{_native.BUILD_HINT}` (needs g++)")
        return "cpp"
    if forced == "triton":
        if not triton_usable_on(device_type):
            raise LD3MError(f"{_ENV}=triton needs triton and a CUDA tensor, or TRITON_INTERPRET=1 "
                            f"(set before importing triton) for CPU tensors; got {device_type}")
        return "triton" if dtype in KERNEL_DTYPES else "reference"
    if device_type == "cuda":
        if triton_installed():
            return "triton" if dtype in KERNEL_DTYPES else "reference"
        _warn_no_triton_once(op_name)
        return "reference"
    if device_type == "cpu":
        if _native.get_extension() is not None:
            return "cpp"
        _native.warn_fallback_once(op_name)
    return "reference"


def describe(device_type: str) -> str:
    """What `choose` would pick on `device_type` for float32, without building anything."""
    try:
        forced = forced_backend()
    except LD3MError as error:
        return f"invalid ({error})"
    if forced == "reference":
        return "reference (forced)"
    if forced == "cpp":
        return "cpp (forced)" if device_type == "cpu" and _native.may_be_available() else "error (forced cpp)"
    if forced == "triton":
        return "triton (forced)" if triton_usable_on(device_type) else "error (forced triton)"
    if device_type == "cuda":
        return "triton" if triton_installed() else "reference (triton not installed)"
    return "cpp" if _native.may_be_available() else "reference (C++ extension unavailable)"
