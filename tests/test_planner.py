"""The planner: one iteration of the real code path under fake tensors, extrapolated."""
import pytest

from ld3m_fast import LD3MError
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.planner.memory import parse_bytes
from ld3m_fast.distill.planner.plan import (candidate_chunks, candidate_decoder_chunks, mode_name, plan,
                                            planning_config, released_reference, sac_levels, store_counts)
from ld3m_fast.distill.planner.simulate import Walk, estimate, image_unit


def _spec(*, num_classes=6, world_size=1, **overrides):
    """The walk of a small run on the test-size prior (settings as `DistillConfig` fields)."""
    base = dict(prior="tiny", res=32, ipc=2, steps=5, chunk=2, batch_real=8, width=16, syn_steps=3, micro_batch=2)
    config = planning_config(DistillConfig(**{**base, **overrides}))
    return Walk.of(config, num_classes, world_size)


@pytest.mark.parametrize("algorithm,knobs", [
    ("dm", {}), ("mtt", {}),
    pytest.param("dm", dict(steps=3, num_classes=2, store_steps=3, sac_min_flops=1000.0, decoder_chunk=1),
                 marks=pytest.mark.slow)])
def test_extrapolation_matches_direct_simulation(algorithm, knobs):
    """Every step stored (here under selective checkpointing) extrapolates from T in {1, 2} too."""
    spec = _spec(algorithm=algorithm, **knobs)
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
    assert candidate_chunks(_spec(ipc=10, num_classes=10)) == [1, 2, 5, 10, 20, 50, 100]


def test_plan_picks_the_cheapest_candidate_that_fits():
    spec = _spec(algorithm="dm", steps=3)
    options = dict(chunks=[1, 2], micro_batches=[2], store_steps=[0], decoder_chunks=[1])
    candidates, best = plan(spec, budget_bytes=parse_bytes("1GiB"), **options)
    assert best is not None and best.fits and best.walk.config.chunk == 2  # the largest that fits
    peak = {c: estimate(spec.at(chunk=c, decoder_chunk=1, store_steps=0)).peak_bytes for c in (1, 2)}
    assert peak[1] < peak[2]
    candidates, best = plan(spec, budget_bytes=int((peak[1] + peak[2]) / 2), **options)
    assert best.walk.config.chunk == 1 and {c.walk.config.chunk for c in candidates} == {1, 2}
    _, nothing = plan(spec, budget_bytes=1024, chunks=[2], micro_batches=[2], store_steps=[0])
    assert nothing is None


@pytest.mark.slow
def test_stored_steps_between_zero_and_all_are_exact_in_flops_and_an_upper_bound_in_peak():
    spec = _spec(steps=3, store_steps=2, num_classes=2, decoder_chunk=2)
    between = estimate(spec)
    direct = estimate(spec, direct=True)
    assert "interpolated" in between.method
    assert between.flops == pytest.approx(direct.flops, rel=1e-3)
    # An upper bound, up to the 2% the extrapolation of its two ends may itself be off by.
    assert 0.98 * direct.peak_bytes <= between.peak_bytes <= 1.15 * direct.peak_bytes


def test_plan_trades_memory_for_flops_and_takes_the_largest_chunk_that_fits():
    """Whole graphs cost fewer FLOPs and more memory than recompute: the planner keeps them when
    the budget allows, recomputes when it does not, and never picks a candidate over budget."""
    spec = _spec(algorithm="dm", steps=2, num_classes=2)  # simulated directly: T <= 2, 2 classes
    options = dict(chunks=[2, 4], micro_batches=[2], store_steps=[0, 2], sac=[None], decoder_chunks=[1, 2])
    rich, chosen = plan(spec, parse_bytes("1GiB"), **options)
    recompute = next(c for c in rich if c.mode == "recompute")
    assert chosen.mode == "graph last 2/2" and chosen.estimate.flops < recompute.estimate.flops
    assert chosen.walk.config.chunk == 4 and chosen.walk.config.decoder_chunk == 2  # the largest that fit
    stored = max(c.estimate.peak_bytes for c in rich if c.walk.config.store_steps == 2)
    lean = max(c.estimate.peak_bytes for c in rich if c.mode == "recompute")
    budget = int((stored + lean) / 2)
    candidates, chosen = plan(spec, budget, **options)
    assert chosen.mode == "recompute" and chosen.fits
    assert all(c.fits == (c.estimate.peak_bytes <= budget) for c in candidates)
    cheaper = [c for c in candidates if c.fits and c.estimate.flops < chosen.estimate.flops]
    assert not cheaper


def test_candidate_knobs():
    spec = _spec(steps=8)
    assert store_counts(8) == [0, 2, 4, 6, 8]
    assert store_counts(8, [3, 0]) == [0, 3]
    with pytest.raises(LD3MError, match="stored steps"):
        store_counts(8, [9])
    assert candidate_decoder_chunks(10) == [1, 2, 5, 10]
    assert candidate_decoder_chunks(4, [2, 8]) == [2, 4]
    levels = sac_levels(spec)
    assert levels == sorted(levels, reverse=True) and len(levels) >= 2 and levels[-1] > 0
    assert mode_name(_spec(store_steps=2)) == "graph last 2/5"
    assert mode_name(_spec(store_steps=5, sac_min_flops=64.0)) == "sac>=64 last 5/5"
    assert mode_name(_spec()) == "recompute"


def test_released_reference_is_the_released_scheme_as_released():
    released = released_reference(_spec(num_classes=2, steps=2))
    config = released.walk.config
    assert config.grad_mode == "released" and config.attention_checkpointed
    assert config.micro_batch is None and config.chunk == 4  # all 4 images: fewer than 10
    plain = estimate(_spec(num_classes=2, steps=2, grad_mode="released", chunk=4, micro_batch=None))
    assert released.flops > plain.flops  # the transformer blocks' 4th forward


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("40 GB") == 40 * 10**9
    with pytest.raises(LD3MError, match="memory size"):
        parse_bytes("lots")


def test_simulated_candidates_are_kept_on_disk_and_reused(tmp_path, monkeypatch):
    """A second plan (another budget) walks nothing and writes the same candidates; a changed
    setting walks again."""
    import json

    from ld3m_fast.cli.main import main
    from ld3m_fast.distill.planner import simulate as simulation

    monkeypatch.setenv("LD3M_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LD3M_FAST_PLANNER_CACHE", raising=False)
    walks = []
    walk = simulation._walk
    monkeypatch.setattr(simulation, "_walk", lambda spec: walks.append(spec) or walk(spec))

    def plan_json(name, budget="1GiB", steps="2"):
        simulation.forget_walks()  # a new process: only the disk remembers
        code = main(["plan", "--prior", "tiny", "--res", "32", "--ipc", "1", "--classes", "2", "--steps", steps,
                     "--chunk", "2", "--store-steps", "0", "--micro-batch", "2", "--memory-budget", budget,
                     "--memory-reserve", "0", "--json", str(tmp_path / name)])
        assert code == 0
        return json.loads((tmp_path / name).read_text())

    first = plan_json("first.json")
    assert walks and len(list((tmp_path / "cache" / "planner").glob("*.json"))) == len(set(walks))
    walks.clear()
    again = plan_json("again.json", budget="2GiB")
    assert walks == []
    assert again["candidates"] == first["candidates"] and again["released"] == first["released"]
    assert again["setting"]["budget_bytes"] == 2 * first["setting"]["budget_bytes"]
    plan_json("other.json", steps="3")
    assert walks and all(walk.config.steps in (1, 2, 3) for walk in walks)

    monkeypatch.setenv("LD3M_FAST_PLANNER_CACHE", "0")
    walks.clear()
    plan_json("off.json")
    assert walks
    simulation.forget_walks()


def test_the_largest_stored_count_that_fits_is_found_between_the_default_counts():
    """Defaults at T=8 are 0, 2, 4, 6, 8 stored steps; a budget between 5's peak and 6's gets 5."""
    spec = _spec(algorithm="dm", steps=8, num_classes=2)
    peak = lambda k: estimate(spec.at(chunk=2, decoder_chunk=1, store_steps=k)).peak_bytes  # noqa: E731
    assert peak(5) < peak(6)
    budget = int((peak(5) + peak(6)) / 2)
    candidates, chosen = plan(spec, budget, chunks=[2], micro_batches=[2], sac=[None], decoder_chunks=[1])
    assert chosen.walk.config.store_steps == 5 and chosen.fits
    assert all(c.fits for c in candidates if c.walk.config.store_steps not in (0, 2, 4, 6, 8))  # misses not listed
