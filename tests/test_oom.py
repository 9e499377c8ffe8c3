"""An out-of-memory error never ends a run: the iteration is planned again in smaller pieces and
redone; only when nothing fits does the run stop, in one line, its checkpoint intact."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensor

from ld3m_fast import generator as generator_module
from ld3m_fast.distill.run import start_run
from ld3m_fast.errors import LD3MError

from test_loop import config, workspace  # noqa: F401 - the loop's module fixture


def _inject_oom(monkeypatch, when):
    """Make the chain's backward raise torch.OutOfMemoryError whenever `when(generator)` says so."""
    real = generator_module._recompute_chunk
    calls = {"raised": 0}

    def recompute(gen, Z, *args, **kwargs):
        if when(gen) and not isinstance(Z, FakeTensor):  # the run's iterations, not the planner's walks
            calls["raised"] += 1
            raise torch.OutOfMemoryError("CPU out of memory (injected by the test)")
        return real(gen, Z, *args, **kwargs)

    monkeypatch.setattr(generator_module, "_recompute_chunk", recompute)
    return calls


def test_an_oom_is_planned_again_and_the_same_iteration_redone(workspace, tmp_path, monkeypatch, caplog):  # noqa: F811
    settings = dict(ipc=2, iterations=3, save_every=1, chunk="auto", memory_budget="1GiB", memory_reserve="0")
    whole = start_run(config(workspace, tmp_path / "whole", **settings))
    assert whole.setup.plan["knobs"]

    armed = {"generator": None}
    calls = _inject_oom(monkeypatch, lambda gen: gen is armed["generator"])

    def arm(iteration):
        if iteration == 1:  # iteration 2 runs out of memory with the first plan's generator
            armed["generator"] = cut_run["distiller"].setup.generator

    cut_run = {}
    from ld3m_fast.distill import run as run_module

    made = run_module.Distiller.__init__

    def remember(self, *args, **kwargs):
        made(self, *args, **kwargs)
        cut_run["distiller"] = self

    monkeypatch.setattr(run_module.Distiller, "__init__", remember)
    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        cut = start_run(config(workspace, tmp_path / "cut", **settings), on_iteration=arm)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert calls["raised"] == 1 and cut.iteration == 3
    assert any("out of memory at iteration 2" in m and "redoing iteration 2" in m for m in warnings)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    (replan,) = [r for r in records if "plan" in r]
    plan = replan["plan"]
    assert replan["iteration"] == 2 and "injected" in replan["replanned_after"]
    assert plan["planned_peak_bytes"] <= plan["usable_bytes"] <= 0.85 * plan["failed_plan_peak_bytes"] + 1
    assert cut.setup.generator is not armed["generator"]  # the new plan's chunking from then on
    assert [r["iteration"] for r in records if "loss" in r] == [1, 2, 3]  # no iteration lost or repeated
    # The same iterations: only the chunking changed.
    a = load_file(str(tmp_path / "whole" / "final" / "synthetic.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "synthetic.safetensors"))
    for key in ("Z", "c"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_when_nothing_fits_the_run_stops_in_one_line_with_its_checkpoint(workspace, tmp_path, monkeypatch):  # noqa: F811
    _inject_oom(monkeypatch, lambda gen: True)  # every plan runs out of memory
    with pytest.raises(LD3MError) as caught:
        start_run(config(workspace, tmp_path / "run", ipc=2, iterations=2, chunk=2))
    message = str(caught.value)
    assert "\n" not in message and "out of memory at iteration 1" in message
    assert "no plan fits" in message and "ld3m-fast distill --resume" in message
    assert "checkpoint of iteration 0" in message and (tmp_path / "run" / "checkpoint.safetensors").is_file()
