"""Optional ahead-of-time build of the C++ CPU kernels in csrc/.

Metadata lives in pyproject.toml. This file only adds the native extension, and
only when it can: torch must already be importable in the build environment
(`pip install --no-build-isolation ...`), and LD3M_FAST_BUILD_EXT must not be "0".
A plain `pip install -e .` builds in an isolated environment without torch, so
it skips the extension and stays fast; the ops then compile just in time on
first use (ld3m_fast/ops/_native.py), or fall back to the PyTorch reference.
A failed compile never breaks the install.
"""
import glob
import os
import sys

from setuptools import setup


def _native_extension():
    if os.environ.get("LD3M_FAST_BUILD_EXT", "1") == "0":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    here = os.path.dirname(os.path.abspath(__file__))
    # Relative paths: setuptools wants sources relative to setup.py. All .cpp files in csrc/
    # (kernels + bindings.cpp) form the one module ld3m_fast._C.
    sources = sorted(os.path.relpath(path, here) for path in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not sources:
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

    extension = CppExtension(
        "ld3m_fast._C", sources,
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_native_extension())
