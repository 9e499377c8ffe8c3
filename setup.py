"""Ahead-of-time build of the C++ CPU kernels in csrc/, when torch is present.

Metadata lives in pyproject.toml. This file only adds the native extension `ld3m_fast._C`, and
only when it can: torch must be importable in the build environment and LD3M_FAST_BUILD_EXT
must not be "0". The README's install runs pip with `--no-build-isolation` after installing
torch (pinned), setuptools and ninja, so the build sees the venv's torch and compiles the kernels
during `pip install` (about a minute). Plain `pip install .` builds in an isolated environment
without torch (we never let pip download one: an unpinned torch is a multi-GB CUDA build), so it
skips the extension; the ops then compile just in time on first use (ld3m_fast/ops/_native.py),
or fall back to the PyTorch reference. A failed compile never fails the install.

The module carries the hash of the sources it was compiled from: after csrc/ changes (a git
pull over an editable install) it is stale, and the library ignores it for a just-in-time build.
"""
import glob
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _native_module():
    """ld3m_fast/ops/_native.py loaded on its own (flags and source hash shared with the JIT build)."""
    path = os.path.join(HERE, "ld3m_fast", "ops", "_native.py")
    spec = importlib.util.spec_from_file_location("_ld3m_fast_native_for_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_extension():
    if os.environ.get("LD3M_FAST_BUILD_EXT", "1") == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("ld3m-fast: torch is not importable in this build environment, so the C++ kernels "
              "are not built ahead of time (they compile just in time on first use); "
              "see README 'Set-up' for `pip install --no-build-isolation`.", file=sys.stderr)
        return {}
    # Relative paths: setuptools wants sources relative to setup.py. All .cpp files in csrc/
    # (kernels + bindings.cpp) form the one module ld3m_fast._C.
    sources = sorted(os.path.relpath(path, HERE) for path in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    if not sources:
        return {}
    try:
        cflags, ldflags = _native_module().compile_flags(os.path.join(HERE, "csrc"))
    except Exception as error:  # never fail the install over the optional build
        print(f"ld3m-fast: C++ extension not built ({error!r})", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as error:  # a failed compile must not fail the install
                print(f"ld3m-fast: C++ extension not built ({error}); "
                      "ops will build just in time or use the reference.", file=sys.stderr)
                # Forget the extension so the in-place/editable copy step and get_outputs()
                # do not look for a library that was never produced.
                self.extensions = []

    # -g0: Python's own CFLAGS ask for debug info, which makes this compile about twice as slow
    # and the module ~10x larger; the just-in-time build has none either.
    extension = CppExtension("ld3m_fast._C", sources, extra_compile_args=[*cflags, "-g0"],
                             extra_link_args=[*ldflags, "-g0"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_native_extension())
