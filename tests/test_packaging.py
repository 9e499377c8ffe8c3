"""The built wheel ships the Triton and C++ sources inside the package."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                   check=True, env={"LD3M_FAST_BUILD_EXT": "0", "PATH": "/usr/bin:/bin"})
    (path,) = out.glob("ld3m_fast-*.whl")
    return path


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("ld3m_fast/kernels/ld3m_step.py", "ld3m_fast/kernels/tm_distance.py",
                     "ld3m_fast/csrc/ld3m_step.cpp", "ld3m_fast/csrc/tm_distance.cpp",
                     "ld3m_fast/data/imagenet_wnids.txt", "ld3m_fast/data/fashion_mnist_subset.npz"):
        assert expected in names


@pytest.mark.slow
def test_wheel_imports_kernels_in_a_fresh_venv(wheel, tmp_path):
    """A fresh venv with torch==2.13.0 + the wheel's dependencies can import the kernels."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + [str(wheel), "triton"], check=True)
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'; import ld3m_fast.kernels.ld3m_step, "
            "ld3m_fast.kernels.tm_distance, ld3m_fast; from importlib import resources; "
            "assert resources.files('ld3m_fast.csrc').joinpath('ld3m_step.cpp').is_file(); print('ok')")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
