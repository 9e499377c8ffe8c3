"""Faults a run meets: a full disk or a read-only filesystem at a checkpoint or at the final export,
memory a setting or a prior's config would exhaust, damaged checkpoints. Each is one line (exit
code 2), the checkpoint stays intact and resumable, nothing is half-written.

A full disk is simulated (the write raises what safetensors or the OS raise on one), never made.
"""
import errno
import json
import logging
import shutil

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ld3m_fast import generator as generator_module
from ld3m_fast.distill.algorithms import DM
from ld3m_fast.distill.checkpoints import CHECKPOINT, PREVIOUS
from ld3m_fast.distill.run import resume_run, start_run
from ld3m_fast.errors import LD3MError

from _workspace import assert_one_line_error, distill_flags, files_under, run_cli
from test_loop import config, workspace  # noqa: F401 - the loop's module fixture

FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def _iteration(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["iteration"])


def _fail_writes(monkeypatch, when, error):
    """Make safetensors' save_file raise `error` for the paths `when(path)` picks (after the
    temporary file was opened: what a full disk does half-way through a write)."""
    real = safetensors.torch.save_file
    calls = {"failed": 0}

    def save_file(tensors, path, metadata=None):
        if when(str(path)):
            calls["failed"] += 1
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise error
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


def _no_partial_files(run):
    return not [p for p in run.rglob("*") if ".ld3m-partial" in p.name]


@pytest.mark.parametrize("error, said", [(SafetensorError(FULL_DISK), "No space left on device"),
                                         (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
                                         (OSError(errno.EROFS, "Read-only file system"), "Read-only file system")],
                         ids=["safetensors-full-disk", "os-full-disk", "read-only"])
def test_a_failed_checkpoint_write_is_one_line_and_the_last_stays_intact(workspace, tmp_path, monkeypatch,  # noqa: F811
                                                                         capsys, error, said):
    run = tmp_path / "run"
    saves = {"n": 0}

    def third_checkpoint(path):
        if "checkpoint" in path:
            saves["n"] += 1
        return "checkpoint" in path and saves["n"] == 3  # iterations 0 and 1 are written, 2 fails

    calls = _fail_writes(monkeypatch, third_checkpoint, error)
    code, _, err = run_cli(distill_flags(workspace, run, "--iterations", 3, "--save-every", 1), capsys)
    line = assert_one_line_error(code, err, f"cannot write {run / CHECKPOINT} ({said})",
                                 "the checkpoint of iteration 1 is intact", "ld3m-fast distill --resume")
    assert calls["failed"] == 1 and "Traceback" not in line
    assert (_iteration(run / CHECKPOINT), _iteration(run / PREVIOUS)) == (1, 0)
    assert _no_partial_files(run) and not (run / "final").exists()
    monkeypatch.undo()  # the disk has room again: the advice works
    resumed = resume_run(run)
    assert resumed.iteration == 3 and (run / "final" / "synthetic.safetensors").is_file()


def test_a_full_disk_at_the_final_export_leaves_no_half_export(workspace, tmp_path, monkeypatch, capsys):  # noqa: F811
    run = tmp_path / "run"
    # The export's last file fails, inside the export's temporary folder.
    calls = _fail_writes(monkeypatch, lambda path: "synthetic.safetensors" in path, SafetensorError(FULL_DISK))
    code, _, err = run_cli(distill_flags(workspace, run, "--iterations", 2), capsys)
    assert_one_line_error(code, err, f"cannot write {run / 'final'} (No space left on device)",
                          "the checkpoint of iteration 2 is intact", "ld3m-fast distill --resume")
    assert calls["failed"] == 1
    assert not (run / "final").exists() and _no_partial_files(run)  # images.safetensors was written, then undone
    monkeypatch.undo()
    resume_run(run)  # a finished run's resume writes the export
    assert sorted(p.name for p in (run / "final").iterdir()) == ["images.png", "images.safetensors",
                                                                  "synthetic.safetensors"]


def test_the_newest_two_checkpoints_are_kept(workspace, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=3, save_every=1))
    assert (_iteration(run / CHECKPOINT), _iteration(run / PREVIOUS)) == (3, 2)
    assert {p.name for p in run.iterdir() if "checkpoint" in p.name} == {CHECKPOINT, PREVIOUS}


def _poison_newest(run, key="Z"):
    with safe_open(str(run / CHECKPOINT), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(run / CHECKPOINT)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, run / CHECKPOINT, metadata=metadata)


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_bit_identically(workspace, tmp_path, caplog):  # noqa: F811
    whole = tmp_path / "whole"
    start_run(config(workspace, whole, iterations=3, save_every=1))
    cut = tmp_path / "cut"
    start_run(config(workspace, cut, iterations=2, save_every=1))
    _poison_newest(cut)
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        resume_run(cut, {"iterations": 3})
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Z holds NaN or inf: resuming from the one before it" in m and "(iteration 1)" in m for m in said)
    a, b = load_file(whole / "final" / "synthetic.safetensors"), load_file(cut / "final" / "synthetic.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in ("Z", "c", "labels"))


def test_a_kill_between_the_two_renames_resumes_from_the_previous(workspace, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=2, save_every=1))
    (run / CHECKPOINT).unlink()  # killed after the newest became the previous one
    resumed = resume_run(run, {"iterations": 3})
    assert resumed.iteration == 3 and _iteration(run / CHECKPOINT) == 3


def test_the_nan_advice_names_the_last_finite_checkpoint_and_works(workspace, tmp_path, monkeypatch):  # noqa: F811
    """The newest checkpoint is not finite: the NaN stop says so, names the previous one, and
    following its advice reaches the end of the run."""
    run = tmp_path / "run"
    start_run(config(workspace, run, iterations=2, save_every=1))
    _poison_newest(run)
    original = DM.image_gradient
    monkeypatch.setattr(DM, "image_gradient", lambda self, images, labels, ctx: (
        float("nan"), original(self, images, labels, ctx)[1]))
    with pytest.raises(LD3MError) as stopped:
        resume_run(run, {"iterations": 3})  # takes iteration 1, stops at iteration 2
    message = str(stopped.value)
    assert "loss became nan at iteration 2" in message and "\n" not in message
    assert "The newest checkpoint is not finite either" in message and "Z holds NaN or inf" in message
    assert f"the last finite one, which a resume takes, is {run / PREVIOUS} (iteration 1)" in message
    monkeypatch.undo()
    resumed = resume_run(run, {"iterations": 3, "lr_latent": 0.01, "lr_class": 0.01})
    assert resumed.iteration == 3


def test_a_cpu_allocation_failure_is_planned_again(workspace, tmp_path, monkeypatch, caplog):  # noqa: F811
    """torch's CPU allocator raises a RuntimeError, not OutOfMemoryError: the same re-plan."""
    real = generator_module._recompute_chunk
    raised = {"n": 0}

    def recompute(gen, Z, *args, **kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        if raised["n"] == 0 and not isinstance(Z, FakeTensor):
            raised["n"] += 1
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 140737488355328 bytes. Error code 12")
        return real(gen, Z, *args, **kwargs)

    monkeypatch.setattr(generator_module, "_recompute_chunk", recompute)
    with caplog.at_level(logging.WARNING, logger="ld3m_fast"):
        run = start_run(config(workspace, tmp_path / "run", ipc=2, iterations=2, chunk="auto", memory_budget="1GiB",
                               memory_reserve="0"))
    assert raised["n"] == 1 and run.iteration == 2
    assert any("out of memory at iteration 1" in m for m in caplog.messages)


# ----------------------------------------------------------------------------- a prior's sizes

def _edit(relative, change):
    def damage(prior):
        path = prior / relative
        values = json.loads(path.read_text())
        change(values)
        path.write_text(json.dumps(values))
    return damage


def _wide_unet(config):
    config["block_out_channels"] = [65536] * len(config["block_out_channels"])


# (name, damage to a copy of the workspace's prior, fragments). RAM is fixed at 16 GiB so the
# figures do not depend on the machine.
PRIOR_SIZE_CASES = [
    ("num_train_timesteps 1e9", _edit("scheduler/scheduler_config.json", lambda c: c.update(num_train_timesteps=10**9)),
     ["num_train_timesteps 1000000000 need at least 64 GB", "17.2 GB of RAM available"]),
    ("num_train_timesteps 1e12", _edit("scheduler/scheduler_config.json",
                                       lambda c: c.update(num_train_timesteps=10**12)), ["need at least 6.4e+04 GB"]),
    ("block_out_channels 65536", _edit("unet/config.json", _wide_unet),
     ["unet/config.json", "its sizes make a UNet2DConditionModel whose float32 weights need at least"]),
    ("vq block_out_channels 65536", _edit("vqvae/config.json", _wide_unet), ["VQModel whose float32 weights"]),
    ("manifest image_size 1e6", _edit("ld3m_prior.json", lambda m: m.update(image_size=10**6)),
     ["one class's 1 synthetic image at 1000000² cannot fit"]),
]


@pytest.mark.parametrize("name, damage, fragments", PRIOR_SIZE_CASES, ids=[c[0] for c in PRIOR_SIZE_CASES])
def test_a_prior_too_large_for_memory_is_one_line_before_anything_is_built(workspace, tmp_path, monkeypatch,  # noqa: F811
                                                                           capsys, name, damage, fragments):
    from ld3m_fast.distill.planner import memory

    monkeypatch.setattr(memory, "_available_ram", lambda: 16 * 2**30)
    prior = tmp_path / "prior"
    shutil.copytree(workspace / "prior", prior)
    damage(prior)
    before = files_under(tmp_path)
    argv = ["distill", "--prior", prior, "--data", workspace / "data", "--cache-dir", workspace / "cache", "--ipc", 1,
            "--steps", 2, "--width", 8, "--iterations", 1, "--out", tmp_path / "run", "--threads", 1, "--no-progress"]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert files_under(tmp_path) == before and not (tmp_path / "run").exists()


def test_checkpoints_are_checked_for_a_non_finite_optimiser_state_before_they_are_written(workspace, tmp_path,  # noqa: F811
                                                                                         monkeypatch):
    """A momentum that became inf (while Z stayed finite) stops the run before it is checkpointed."""
    real_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        for state in self.state.values():
            if "momentum_buffer" in state:
                buffer = state["momentum_buffer"]
                buffer[(0,) * buffer.dim()] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run = tmp_path / "run"
    with pytest.raises(LD3MError, match="momentum became non-finite at iteration 1.*last good checkpoint "
                                        r"\(iteration 0\)"):
        start_run(config(workspace, run, iterations=2, save_every=1))
    assert _iteration(run / CHECKPOINT) == 0 and torch.isfinite(load_file(run / CHECKPOINT)["Z"]).all()
