"""Building the C++ extension: a cache folder keyed to what is compiled, no endless wait on a
killed build's lock, a stale ahead-of-time module ignored, and statuses that say which is which.

The module keeps its extension per process, so builds and loads run in subprocesses, under a
TORCH_EXTENSIONS_DIR in a temporary folder; the one real compile (about a minute here) is shared
by the tests that need it. The subprocesses hide any ahead-of-time `ld3m_fast._C` so that they
exercise the just-in-time path.
"""
from __future__ import annotations

import fcntl
import importlib.machinery
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from ld3m_fast.ops import _native

ROOT = Path(__file__).resolve().parents[1]
# Only stops a hang from stalling the suite; a build takes about a minute on a busy 2-core machine.
HANG_GUARD_S = 1800
NO_AOT = "import sys; sys.modules['ld3m_fast._C'] = None  # as if not built ahead of time\n"
# The build's messages (INFO on ld3m_fast's loggers) as plain lines on stdout.
SAY = "import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(message)s')\n"
ENSURE = NO_AOT + SAY + (
    "from ld3m_fast.ops import _native\n"
    "print('before:', _native.status())\n"
    "print('after:', _native.ensure_extension())\n"
    "module = _native.get_extension()\n"
    "print('hash:', module.source_hash, _native.source_hash())\n")


def run_python(code: str, extensions_dir: Path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("LD3M_FAST_JIT", "LD3M_FAST_BACKEND")}
    environment.update(TORCH_EXTENSIONS_DIR=str(extensions_dir), **env)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def copy_sources(destination: Path) -> Path:
    return Path(shutil.copytree(_native.csrc_dir(), destination, ignore=shutil.ignore_patterns("__pycache__")))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(extensions root, build folder, output) of one real build that started over the leftovers of
    a killed build: the folder with torch's `lock` file and a half-written library in it."""
    missing = _native._compiler_missing()
    if missing is not None:
        pytest.skip(f"cannot compile the C++ extension here: {missing}")
    root = tmp_path_factory.mktemp("torch_extensions")
    folder = root / "ld3m_fast" / _native.build_dir().name
    folder.mkdir(parents=True)
    (folder / "lock").touch()  # what a build killed inside torch's load() leaves behind
    (folder / "ld3m_fast_C.so").write_bytes(b"\x7fELF, cut short")
    return root, folder, run_python(ENSURE, root)


def test_a_killed_builds_lock_does_not_block_a_fresh_process(built):
    root, folder, result = built
    lines = result.stdout.splitlines()
    assert f"before: buildable (compiles just in time on first use into {folder})" in lines
    assert f"ld3m-fast: compiling the C++ CPU kernels (first use; cached in {folder})..." in lines
    assert any(line.startswith("ld3m-fast: compiled the C++ CPU kernels in ") for line in lines)
    assert f"after: loaded (just-in-time build in {folder})" in lines
    assert not (folder / "lock").exists()
    assert (folder / "build.json").is_file()
    hashes = next(line for line in lines if line.startswith("hash:")).split()[1:]
    assert hashes[0] == hashes[1]  # the module carries the hash of the sources it was built from


def test_a_second_process_loads_the_cache_without_compiling(built):
    root, folder, _ = built
    result = run_python(ENSURE, root)
    assert "compiling" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"before: built (just-in-time cache in {folder})" in lines
    assert f"after: loaded (just-in-time build in {folder})" in lines


def test_a_stale_ahead_of_time_module_is_ignored_for_the_jit_build(built):
    """An `ld3m_fast._C` compiled from other sources (csrc/ changed after the install) is not run."""
    root, folder, _ = built
    code = (
        "import importlib.machinery, sys, types\n"
        "stale = types.ModuleType('ld3m_fast._C')\n"
        "stale.__spec__ = importlib.machinery.ModuleSpec('ld3m_fast._C', None)\n"
        "stale.source_hash = '0123456789abcdef'\n"
        "sys.modules['ld3m_fast._C'] = stale\n"
        + SAY +
        "from ld3m_fast.ops import _native\n"
        "print('before:', _native.status())\n"
        "print('module:', _native.get_extension().__name__)\n"
        "print('after:', _native.status())\n")
    lines = run_python(code, root).stdout.splitlines()
    before, after = (next(line for line in lines if line.startswith(p)) for p in ("before:", "after:"))
    assert before.startswith(f"before: built (just-in-time cache in {folder}); stale ahead-of-time build ignored")
    assert "module: ld3m_fast_C" in lines
    assert after.startswith(f"after: loaded (just-in-time build in {folder}); stale ahead-of-time build ignored")


def fake_aot(source_hash: str) -> types.ModuleType:
    module = types.ModuleType("ld3m_fast._C")
    module.__spec__ = importlib.machinery.ModuleSpec("ld3m_fast._C", None)
    module.source_hash = source_hash
    return module


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """_native as in a new process, with an empty extensions cache and no ahead-of-time module."""
    for name, value in (("_module", None), ("_module_dir", None), ("_failure", None), ("_aot", None)):
        monkeypatch.setattr(_native, name, value)
    monkeypatch.setitem(sys.modules, "ld3m_fast._C", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    for name in ("LD3M_FAST_JIT", "LD3M_FAST_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    return _native


def test_an_ahead_of_time_module_from_the_current_sources_is_used(fresh_native, monkeypatch):
    current = fake_aot(fresh_native.source_hash())
    monkeypatch.setitem(sys.modules, "ld3m_fast._C", current)
    assert fresh_native.status() == "built (ahead-of-time ld3m_fast._C)"
    assert fresh_native.get_extension() is current
    assert fresh_native.status() == "loaded (ahead-of-time ld3m_fast._C)"


def test_status_names_a_stale_ahead_of_time_module_without_building(fresh_native, monkeypatch):
    monkeypatch.setitem(sys.modules, "ld3m_fast._C", fake_aot("0123456789abcdef"))
    line = fresh_native.status()
    assert "stale ahead-of-time build ignored" in line and "0123456789abcdef" in line
    assert line.startswith(("buildable", "unavailable"))
    assert not fresh_native.build_dir().exists()
    monkeypatch.setenv("LD3M_FAST_JIT", "0")
    assert fresh_native.status().startswith("unavailable: LD3M_FAST_JIT=0")
    assert not fresh_native.may_be_available()


def test_ensure_extension_reports_a_missing_compiler_instead_of_raising(fresh_native, monkeypatch, tmp_path,
                                                                        caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.DEBUG, logger="ld3m_fast"):
        line = fresh_native.ensure_extension()
    assert line == "unavailable: no C++ compiler on PATH (install g++ or set CXX)"
    assert caplog.messages == [] and fresh_native.get_extension() is None


def test_each_source_tree_gets_its_own_cache_folder(tmp_path):
    one, same, edited, header = (copy_sources(tmp_path / name) for name in ("one", "same", "edited", "header"))
    with open(edited / "ld3m_step.cpp", "a") as file:
        file.write("\n// an edit\n")
    with open(header / "ld3m_fast_ops.h", "a") as file:
        file.write("\n// an edit\n")
    assert _native.build_dir(one) == _native.build_dir(one)
    assert _native.build_dir(one).parent == _native.cache_root()
    # identical contents in two folders: two checkouts never share a build
    assert _native.source_hash(one) == _native.source_hash(same)
    assert _native.build_dir(one) != _native.build_dir(same)
    assert len({_native.source_hash(tree) for tree in (one, edited, header)}) == 3
    assert len({_native.build_dir(tree) for tree in (one, same, edited, header)}) == 4


def test_the_key_changes_with_flags_torch_compiler_and_python(tmp_path):
    sources = copy_sources(tmp_path / "csrc")
    base = dict(cflags=["-O3", "-fopenmp"], ldflags=["-fopenmp"], torch_version="2.13.0+cpu cxx11_abi=True",
                compiler="/usr/bin/x86_64-linux-gnu-g++-12\ng++ 12.2.0", python="cpython-311 .cpython-311-x86_64.so")
    key = _native.build_key(sources, **base)
    assert _native.build_key(sources, **base) == key
    changes = [dict(cflags=["-O2", "-fopenmp"]), dict(ldflags=[]), dict(torch_version="2.14.0+cpu cxx11_abi=True"),
               dict(torch_version="2.13.0+cu126 cxx11_abi=True"), dict(torch_version="2.13.0+cpu cxx11_abi=False"),
               dict(compiler="/usr/bin/clang++-16\nclang 16"), dict(python="cpython-312 .cpython-312-x86_64.so")]
    for change in changes:
        assert _native.build_key(sources, **{**base, **change}) != key, change
    # left out, each part is this process's own
    assert _native.build_key(sources) == _native.build_key(
        sources, cflags=_native.compile_flags(sources)[0], ldflags=list(_native.LDFLAGS),
        torch_version=_native.torch_build(), python=_native.python_abi())


def wait_for(condition) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_live_build_is_waited_for_with_one_message(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ld3m_fast")
    entered = threading.Event()

    def build():
        with _native._build_lock(tmp_path):
            entered.set()

    with open(tmp_path / "build.flock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another process's build in progress
        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        wait_for(lambda: caplog.messages)
        assert not entered.is_set()
        (message,) = caplog.messages
        assert "waiting for another process" in message and str(tmp_path) in message
        fcntl.flock(holder, fcntl.LOCK_UN)
    thread.join(HANG_GUARD_S)
    assert entered.is_set() and len(caplog.messages) == 1


def test_a_build_lock_dies_with_its_process(tmp_path, caplog):
    code = ("import sys, time\nfrom pathlib import Path\nfrom ld3m_fast.ops import _native\n"
            "with _native._build_lock(Path(sys.argv[1])):\n"
            "    print('holding', flush=True)\n    time.sleep(3600)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "holding"
        assert (tmp_path / "build.flock").read_text().strip() == str(process.pid)
        with open(tmp_path / "build.flock", "a+") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        process.kill()  # SIGKILL: no cleanup code runs in the holder
        process.wait(HANG_GUARD_S)
        process.stdout.close()
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        with _native._build_lock(tmp_path):
            pass
    assert caplog.messages == []  # taken at once: nothing to wait for
