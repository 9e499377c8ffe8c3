"""A run never loses work: signals, one process per run folder, run identity, leftovers, NaN advice, threads."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from ld3m_fast.distill import runfolder
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.run import CHECKPOINT, resume_run, start_run
from ld3m_fast.errors import LD3MError

from _workspace import (RES, assert_one_line_error, checkpoint_iteration, cli_process, distill_flags, make_workspace,
                        run_cli)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("safety"))


def config(ws, out, **overrides):
    values = dict(data=str(ws / "data"), prior=str(ws / "prior"), ipc=1, steps=2, guidance=1.0, res=RES,
                  width=8, batch_real=4, iterations=3, progress=False, cache_dir=str(ws / "cache"),
                  max_per_class=4, out=str(out), threads=1)
    values.update(overrides)
    return DistillConfig(**values)


def wait_for_iterations(run, count, process):
    """Block until `count` metric lines exist (no deadline: a busy machine is only slower)."""
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= count):
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_iteration_saves_and_says_how_to_resume(ws, tmp_path, signum, exit_code):
    run = tmp_path / "run"
    child = cli_process(*distill_flags(ws, run, "--iterations", 10_000, "--save-seconds", 10_000),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_iterations(run, 2, child)
    child.send_signal(signum)
    out, err = child.communicate()
    line = assert_one_line_error(child.returncode, err, f"{signal.Signals(signum).name} at iteration",
                                 "checkpoint saved", "Resume with: ld3m-fast distill --resume",
                                 exit_code=exit_code)
    stopped = int(re.search(r"at iteration (\d+) of 10000", line).group(1))
    assert stopped >= 2 and checkpoint_iteration(run) == stopped  # nothing lost: the checkpoint is the last iteration
    assert len((run / "metrics.jsonl").read_text().splitlines()) == stopped
    assert "finishing iteration" in out
    # The printed command works (with a nearer end, so the test stays short).
    command = line.split("Resume with: ")[1].split()
    result = cli_process(*command[1:], "--iterations", stopped + 1)
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoint_iteration(run) == stopped + 1 and (run / "final" / "images.png").is_file()


def test_a_run_folder_is_held_by_one_process(ws, tmp_path, capsys):
    run = tmp_path / "run"
    start_run(config(ws, run, iterations=1))
    with runfolder.RunLock(run):  # another holder (a lock is per open file, even in one process)
        code, _, err = run_cli(["distill", "--resume", run, "--iterations", 2, "--no-progress"], capsys)
        assert_one_line_error(code, err, "is in use by another ld3m-fast process", f"pid {os.getpid()}")
        code, _, err = run_cli(distill_flags(ws, tmp_path / "free", "--iterations", 1), capsys)  # others work
        assert code == 0, err
    # Two fresh starts into one --out: the second is refused before it writes anything.
    second = tmp_path / "second"
    second.mkdir()
    with runfolder.RunLock(second):
        with pytest.raises(LD3MError, match="in use by another"):
            start_run(config(ws, second))
    assert sorted(p.name for p in second.iterdir()) == [runfolder.LOCK]


def test_a_checkpoint_of_another_run_is_refused(ws, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    start_run(config(ws, a, seed=0))
    start_run(config(ws, b, seed=1))  # same shapes, another seed
    before = (a / "final" / "synthetic.safetensors").read_bytes()
    shutil.copy(b / CHECKPOINT, a / CHECKPOINT)
    with pytest.raises(LD3MError, match="belongs to another run"):
        resume_run(a, {"iterations": 4})
    assert (a / "final" / "synthetic.safetensors").read_bytes() == before


def test_resume_removes_temporary_files_a_kill_left(ws, tmp_path, caplog):
    run = tmp_path / "run"
    start_run(config(ws, run, iterations=1))
    leftovers = [run / ".ld3m-partial.checkpoint.safetensors.abc123.safetensors",
                 run / "images" / ".ld3m-partial.iter_000001.png.x9.png"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        resume_run(run, {"iterations": 2})
    assert not any(path.exists() for path in leftovers)
    assert any("removed 2 temporary file(s)" in m for m in caplog.messages)


def test_the_nan_advice_works(ws, tmp_path):
    """Following the printed advice (lower learning rates on resume) reaches the end of the run."""
    run = tmp_path / "run"
    with pytest.raises(LD3MError) as stopped:
        start_run(config(ws, run, iterations=3, lr_latent=1e30, lr_class=1e30))
    error, rounds = stopped.value, 0
    while error is not None:  # each piece of advice lowers the rates tenfold
        rounds += 1
        assert rounds <= 12, "the advice never led to a finite run"
        message = str(error)
        assert "last good checkpoint" in message and "--resume" in message
        latent = float(re.search(r"--lr-latent (\S+)", message).group(1))
        klass = float(re.search(r"--lr-class (\S+)", message).group(1))
        try:
            resume_run(run, {"lr_latent": latent, "lr_class": klass})
            error = None
        except LD3MError as again:
            error = again
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr_latent"] == latent and checkpoint_iteration(run) == 3


def test_threads_are_recorded_and_kept_on_resume(ws, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    code, _, err = run_cli(distill_flags(ws, run, "--iterations", 1), capsys)
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["threads"] == 1
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        resume_run(run, {"iterations": 2})  # no --threads: the recorded count
    assert torch.get_num_threads() == 1 and not any("bit-identical" in m for m in caplog.messages)
    # (no iteration left to run: two threads on a busy 2-core test machine would only be slow)
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        resume_run(run, {"iterations": 2, "threads": 2})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("will not be bit-identical" in m for m in warnings)
    assert json.loads((run / "config.json").read_text())["threads"] == 2


def test_default_threads_follow_the_idle_cores(monkeypatch):
    from ld3m_fast import _threads

    monkeypatch.setattr(_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(_threads, "idle_cores", lambda: 1.95)
    assert _threads.default_threads() == 2
    monkeypatch.setattr(_threads, "idle_cores", lambda: 1.02)  # one other busy process
    assert _threads.default_threads() == 1
    monkeypatch.setattr(_threads, "idle_cores", lambda: 0.1)
    assert _threads.default_threads() == 1
    monkeypatch.setattr(_threads, "idle_cores", lambda: None)  # no /proc/stat
    assert _threads.default_threads() == 2


def test_the_cli_sets_a_short_openmp_spin_before_torch_loads_unless_the_user_chose(monkeypatch):
    import sys

    probe = ("import os, sys; import ld3m_fast.cli.main; "
             "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def run(extra):
        return subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,
                              text=True, check=True).stdout.split()

    assert run({}) == ["10000", "None", "False"]  # set before torch (and its OpenMP) loads
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == ["None", "ACTIVE", "False"]
    assert run({"GOMP_SPINCOUNT": "5"}) == ["5", "None", "False"]


def test_time_based_checkpoints(ws, tmp_path):
    run = tmp_path / "run"
    saved = []
    start_run(config(ws, run, iterations=3, save_seconds=0.0), on_iteration=lambda k: saved.append(checkpoint_iteration(run)))
    assert saved == [1, 2, 3]  # with save_seconds 0 every iteration is checkpointed
    run2 = tmp_path / "run2"
    start_run(config(ws, run2, iterations=3, save_seconds=3600.0), on_iteration=lambda k: saved.append(checkpoint_iteration(run2)))
    assert saved[3:] == [0, 0, 3]  # only the start and the end
