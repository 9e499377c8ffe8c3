"""The planner's replayed walks against plain ones: repeated denoiser, decoder, checkpointed and
frozen-network calls replayed from a recording of their first call make the tracker see what the
real calls would have made it see (planner/replay.py)."""
from contextlib import nullcontext

import pytest

from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.planner import replay
from ld3m_fast.distill.planner import simulate as simulation
from ld3m_fast.distill.planner.plan import planning_config

BASE = dict(prior="tiny", res=32, ipc=2, steps=2, chunk=2, batch_real=8, width=16, micro_batch=2)
CASES = {
    "recompute": {}, "stored graphs": dict(store_steps=2), "released, inner checkpointing":
        dict(grad_mode="released", checkpoint_attention="on"),
    "autograd": dict(grad_mode="autograd", chunk=None), "eta 0.5": dict(eta=0.5), "DC": dict(algorithm="dc"),
    "decoder pieces": dict(decoder_chunk=1), "guidance 1": dict(guidance=1.0), "MTT": dict(algorithm="mtt"),
    "selective checkpointing": dict(store_steps=2, sac_min_flops=100.0), "bf16": dict(dtype="bf16"),
    "bf16, stored": dict(dtype="bf16", store_steps=1),
}


def _walks(settings, monkeypatch):
    walk = simulation.Walk.of(planning_config(DistillConfig(**{**BASE, **settings})), 2)
    replay.forget_recordings()
    replayed = simulation._walk(walk)
    again = simulation._walk(walk)  # every call replayed, none recorded
    monkeypatch.setattr(replay, "replaying", lambda *args, **kwargs: nullcontext())
    plain = simulation._walk(walk)
    monkeypatch.undo()
    return replayed, again, plain


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_replayed_walks_match_plain_ones(settings, monkeypatch):
    """FLOPs to the FLOP, op by op; peaks to 0.2%, most of them to the byte (bf16's autocast keeps
    casts of leaves past their graphs, and selective checkpointing's saved inputs: a few KB)."""
    replayed, again, plain = _walks(settings, monkeypatch)
    for walk in (replayed, again):  # the first walk records, the second replays every call
        assert walk.flops == plain.flops and walk.flops_by_op == plain.flops_by_op
        assert walk.peak_bytes == pytest.approx(plain.peak_bytes, rel=2e-3)
        for phase, peak in plain.phase_peaks.items():
            assert walk.phase_peaks[phase] == pytest.approx(peak, rel=2e-3)


def test_calls_inside_a_checkpointed_region_run_for_real():
    """Under saved-tensor hooks (a checkpoint's region) or another dispatch mode a call is not replayed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    seen = []

    def region(x):
        seen.append(replay._replayable())
        return x * 2

    x = torch.ones(2, requires_grad=True)
    checkpoint(region, x, use_reentrant=False)
    assert seen == [False] and replay._replayable()
