"""The planner: one iteration of the real code path under fake tensors, extrapolated."""
import pytest

from ld3m_fast import LD3MError
from ld3m_fast.planner.plan import candidate_chunks, parse_bytes, plan
from ld3m_fast.planner.simulate import IterationSpec, estimate, image_unit


def _spec(**overrides):
    base = dict(prior="tiny", res=32, ipc=2, num_classes=6, steps=5, chunk=2, batch_real=8,
                width=16, syn_steps=3, micro_batch=2)
    return IterationSpec(**{**base, **overrides})


@pytest.mark.parametrize("algorithm", ["dm", "mtt"])
def test_extrapolation_matches_direct_simulation(algorithm):
    spec = _spec(algorithm=algorithm)
    direct = estimate(spec, direct=True)
    extrapolated = estimate(spec)
    assert extrapolated.method.startswith("extrapolated")
    assert extrapolated.peak_bytes == pytest.approx(direct.peak_bytes, rel=0.02)
    assert extrapolated.flops == pytest.approx(direct.flops, rel=0.01)


def test_recompute_peak_is_flat_in_steps_and_autograd_is_not():
    lean = [estimate(_spec(steps=t, grad_mode="recompute")).peak_bytes for t in (10, 40)]
    plain = [estimate(_spec(steps=t, grad_mode="autograd")).peak_bytes for t in (10, 40)]
    assert lean[1] < 1.1 * lean[0]
    assert plain[1] > 2 * plain[0]


def test_recompute_needs_fewer_denoiser_flops_than_released():
    flops = {mode: estimate(_spec(grad_mode=mode, algorithm="dm")).flops for mode in ("released", "recompute")}
    assert flops["recompute"] < 0.85 * flops["released"]


def test_units_and_chunks():
    assert image_unit(_spec(chunk=4, ipc=2)) == 2
    assert image_unit(_spec(chunk=None)) == 1
    assert candidate_chunks(IterationSpec(ipc=10, num_classes=10)) == [1, 2, 5, 10, 20, 50, 100]


def test_plan_picks_the_cheapest_candidate_that_fits():
    spec = _spec(algorithm="dm", steps=3)
    candidates, best = plan(spec, budget_bytes=parse_bytes("1GiB"), chunks=[1, 2], dtypes=("fp32",))
    assert best is not None and best.fits
    assert {c.estimate.spec.chunk for c in candidates} == {1, 2}
    _, nothing = plan(spec, budget_bytes=1024, chunks=[2], dtypes=("fp32",))
    assert nothing is None


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("40 GB") == 40 * 10**9
    with pytest.raises(LD3MError, match="memory size"):
        parse_bytes("lots")
