"""Small on-disk workspaces for run-level tests: a tiny prior, a tiny image folder, the CLI in-process."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from PIL import Image

from ld3m_fast import build_tiny_prior, save_prior

RES = 16


def write_image_folder(root, classes: int, per_class: int, seed: int, res: int = RES) -> None:
    """An ImageFolder tree of noisy, class-tinted PNGs (fast to distil from)."""
    g = torch.Generator().manual_seed(seed)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        tint = torch.zeros(3, 1, 1)
        tint[k % 3] = 120
        for i in range(per_class):
            pixels = (60 + tint + 60 * torch.rand(3, res, res, generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")


def make_workspace(root, *, classes: int = 3, per_class: int = 4):
    """root/prior (tiny prior, 10 classes, 16²) and root/data/{train,test} (an ImageFolder tree)."""
    save_prior(build_tiny_prior(num_classes=10, image_size=RES, seed=0), root / "prior")
    write_image_folder(root / "data" / "train", classes, per_class, seed=0)
    write_image_folder(root / "data" / "test", classes, 3, seed=1)
    return root


def distill_flags(root, out, *extra) -> list[str]:
    """`distill` arguments for a seconds-long run on the workspace of `make_workspace`."""
    return ["distill", "--prior", str(root / "prior"), "--data", str(root / "data"), "--res", str(RES),
            "--ipc", "1", "--steps", "2", "--guidance", "1", "--width", "8", "--batch-real", "4",
            "--max-per-class", "4", "--cache-dir", str(root / "cache"), "--out", str(out),
            "--threads", "1", "--no-progress", "--iterations", "1", *map(str, extra)]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`ld3m-fast ARGV` in this process: (exit code, stdout, stderr)."""
    from ld3m_fast.cli.main import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*args, cwd=None, **popen):
    """`python -m ld3m_fast.cli.main ARGS` as a child process (one OpenMP thread: the test machine
    has 2 shared cores). With popen options, returns the Popen; else waits (no timeout: a busy
    machine must not fail a test) and returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ld3m_fast.cli.main", *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=env, cwd=cwd, text=True, **popen)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


def assert_one_line_error(code, err, *fragments, exit_code=2):
    """Exit code 2 (or `exit_code`), exactly one stderr line 'ld3m-fast ...: error: ...', no traceback."""
    assert code == exit_code, (code, err[-2000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ld3m-fast") and ": error: " in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files_under(root) -> dict:
    """Every file under `root` (a run folder's lock aside) with its bytes: what a refused command
    must leave as it was."""
    from pathlib import Path

    return {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file() and p.name != ".lock"}


def checkpoint_iteration(run) -> int:
    """The iteration recorded in RUN/checkpoint.safetensors."""
    from safetensors import safe_open

    from ld3m_fast.distill.checkpoints import CHECKPOINT

    with safe_open(str(run / CHECKPOINT), framework="pt") as f:
        return int(f.metadata()["iteration"])
