"""fp16: the iteration under fp16 autocast with a gradient scaler on Z and c (cards without bf16).

The image gradient is scaled before it is pushed back through the decoder and the chain; the
step unscales and skips itself when the scaled gradients overflowed (counted in the metrics);
MTT's own dL/dalpha, computed unscaled, is brought to the same scale first. Runs on CPU where
CPU autocast has fp16 (it does in torch 2.13); skips cleanly where it does not."""
import json

import pytest
import torch
from safetensors.torch import load_file

from ld3m_fast.distill.run import resume_run, start_run

from test_loop import config, workspace  # noqa: F401 - the loop's module fixture


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    except (RuntimeError, ValueError):
        return False


pytestmark = pytest.mark.skipif(not _cpu_fp16_autocast(), reason="CPU autocast has no float16 here")


@pytest.mark.parametrize("algorithm", ["dm", "mtt"])
def test_fp16_runs_with_a_scaler_and_counts_skipped_steps(workspace, tmp_path, algorithm):  # noqa: F811
    run = start_run(config(workspace, tmp_path / "run", algorithm=algorithm, dtype="fp16", iterations=4))
    assert run.scaler is not None and run.iteration == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all("loss_scale" in r and "skipped_steps" in r for r in steps)
    assert steps[-1]["skipped_steps"] == sum(r["skipped_step"] for r in steps)
    final = load_file(str(tmp_path / "run" / "final" / "synthetic.safetensors"))
    assert final["Z"].dtype == torch.float32 and torch.isfinite(final["Z"]).all()  # Z stays fp32


def test_fp16_moves_the_latents_as_fp32_does(workspace, tmp_path):  # noqa: F811
    """The scaled, unscaled step is the same update up to fp16's rounding in the denoiser."""
    runs = {dtype: start_run(config(workspace, tmp_path / dtype, dtype=dtype, iterations=2))
            for dtype in ("fp32", "fp16")}
    moved = {d: load_file(str(tmp_path / d / "final" / "synthetic.safetensors"))["Z"] for d in runs}
    assert runs["fp16"].skipped_steps < 2, "every step overflowed"
    assert torch.allclose(moved["fp16"], moved["fp32"], rtol=0.05, atol=0.05 * moved["fp32"].abs().max())


def test_fp16_resume_restores_the_scaler(workspace, tmp_path):  # noqa: F811
    settings = dict(dtype="fp16", iterations=4, save_every=2)
    whole = start_run(config(workspace, tmp_path / "whole", **settings))

    class Stop(Exception):
        pass

    def stop(iteration):
        if iteration == 2:
            raise Stop

    with pytest.raises(Stop):
        start_run(config(workspace, tmp_path / "cut", **settings), on_iteration=stop)
    resumed = resume_run(tmp_path / "cut")
    assert resumed.scaler.get_scale() == whole.scaler.get_scale()
    a = load_file(str(tmp_path / "whole" / "final" / "synthetic.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "synthetic.safetensors"))
    assert torch.equal(a["Z"], b["Z"]) and torch.equal(a["c"], b["c"])
