"""Parts a and b of the pipeline benchmark: every comparison names both sides' settings."""
import pytest

from ld3m_fast import bench


def _row(scheme, comparison, **fields):
    row = {"part": "a", "scheme": scheme, "comparison": comparison, "prior": "cin256-v2", "res": 256, "ipc": 10, "steps": 20,
           "algorithm": "dm", "dtype": "fp32", "grad_mode": "recompute", "chunk": 10, "decoder_chunk": 2,
           "micro_batch": 10, "mode": "recompute", "checkpoint_attention": False, "peak_gib": 7.0,
           "tflops": 2781.0, "phase_peaks_gib": {"render": 3.0, "distill": 5.0, "backward": 7.0}}
    return {**row, **fields}


def test_part_a_tables_name_both_sides_settings():
    released = dict(grad_mode="released", decoder_chunk=None, mode="released", checkpoint_attention=True)
    rows = [
        _row("released (as released)", "equal chunk", peak_gib=16.7, tflops=3822.0, **released),
        _row("ours: recompute, decoder chunk 2", "equal chunk"),
        _row("released (as released)", "equal budget", budget_gib=8, fits=False, micro_batch=None,
             peak_gib=18.4, tflops=3822.0, released_default_tflops=3822.0,
             phase_peaks_gib={"render": 3.7, "distill": 18.4, "backward": 16.7}, **released),
        _row("ours (planner's choice)", "equal budget", budget_gib=8, fits=True),
        _row("released (as released)", "equal budget", budget_gib=24, fits=True, micro_batch=None, chunk=20,
             peak_gib=20.0, tflops=3822.0, released_default_tflops=3822.0, **released),
        _row("ours (planner's choice)", "equal budget", budget_gib=24, fits=True, mode="sac>=17280 last 13/20",
             tflops=2684.0),
    ]
    report = bench.markdown(rows)
    equal_chunk, equal_budget = report.split("### a2.")
    assert "both sides chain chunk 10, student micro-batches of 10" in equal_chunk
    assert "released, attention checkpointed inside; chunk 10; student micro-batch 10" in equal_chunk
    assert "recompute; chunk 10, decoder 2; student micro-batch 10" in equal_chunk
    assert "0.73x" in equal_chunk  # ours' FLOPs against the released row of the same setting
    assert "does not fit (chunk 10: 18.40 GiB, distill)" in equal_budget
    assert "full-batch student" in equal_budget and "sac>=17280 last 13/20" in equal_budget
    assert "| 0.70x |" in equal_budget


@pytest.mark.slow
def test_simulated_parts_run_on_the_tiny_prior():
    rows = bench.simulated_full_scale("tiny", settings=[(32, 1, 2)], budgets_gib=(0.05,), algorithms=("dm",),
                                      classes=2, overrides=dict(batch_real=4, width=8),
                                      plan_options=dict(store_steps=[0, 2], sac=[None], chunks=[1, 2]))
    same = [r for r in rows if r["comparison"] == "equal chunk"]
    assert {r["chunk"] for r in same if r["grad_mode"] != "autograd"} == {2}
    assert {r["micro_batch"] for r in same} == {bench.STUDENT_BATCH}
    budget = [r for r in rows if r["comparison"] == "equal budget"]
    assert [r["scheme"] for r in budget][0].startswith("released") and budget[0]["micro_batch"] is None
    assert all(r["device"].startswith("simulated") for r in rows)
    assert "### a1." in bench.markdown(rows)
