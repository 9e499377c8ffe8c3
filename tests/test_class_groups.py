"""Class groups: with stored steps, DM and DC render, distill and back-propagate one group of
whole classes at a time (`distill.iteration.render_groups`), the same iteration as all at once
with only one group's stored state live."""
import pytest
import torch

from ld3m_fast import LD3MGenerator, SyntheticSet, build_tiny_prior
from ld3m_fast.data import load_dataset
from ld3m_fast.distill import iteration as iteration_module
from ld3m_fast.distill.algorithms import DC, DM, MTT, NetworkSpec, RealData, StepContext
from ld3m_fast.distill.iteration import distill_iteration, render_groups
from ld3m_fast.dsa import DSA
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.planner.plan import planning_config
from ld3m_fast.distill.planner.simulate import Walk, estimate, stored_together

RES = 16
IPC = 2


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    return load_dataset("fashion-mnist", split="train", res=RES, max_per_class=6,
                        cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def prior():
    return build_tiny_prior(num_classes=10, image_size=RES, seed=0).double()


def _labels(classes=4, ipc=IPC):
    return torch.arange(classes).repeat_interleave(ipc)


def _network():
    return NetworkSpec(num_classes=10, res=RES, width=8)


@pytest.mark.parametrize("chunk,expected", [
    (1, [(0, 2), (2, 4), (4, 6), (6, 8)]),   # a chunk inside a class: one class per group
    (2, [(0, 2), (2, 4), (4, 6), (6, 8)]),
    (4, [(0, 4), (4, 8)]),                   # two classes fill one chunk
    (3, [(0, 6), (6, 8)]),                   # whole classes filling whole chunks (the tail is what is left)
    (8, [(None, None)]),                     # one chunk: one group
])
def test_groups_are_whole_classes_filling_whole_chunks(chunk, expected):
    gen = LD3MGenerator(build_tiny_prior(num_classes=10, image_size=RES, seed=0), steps=2, chunk_size=chunk,
                        store_steps=1)
    groups = render_groups(gen, DM(_network()), _labels(), StepContext(real=None, seed=0))
    assert [(g.start, g.stop) for g in groups] == expected


def test_one_group_unless_stored_steps_a_per_class_loss_and_a_seed():
    prior = build_tiny_prior(num_classes=10, image_size=RES, seed=0)
    stored = LD3MGenerator(prior, steps=2, chunk_size=2, store_steps=1)
    seeded = StepContext(real=None, seed=0)
    whole = [slice(None)]
    assert render_groups(LD3MGenerator(prior, steps=2, chunk_size=2), DM(_network()), _labels(), seeded) == whole
    assert render_groups(stored, MTT.__new__(MTT), _labels(), seeded) == whole  # one loss over all images
    unseeded = StepContext(real=None, generator=torch.Generator().manual_seed(0))
    assert render_groups(stored, DM(_network()), _labels(), unseeded) == whole  # sequential draws differ
    assert len(render_groups(stored, DC(_network()), _labels(), seeded)) == 4


def _iterate(prior, real_data, algorithm, *, grouped, monkeypatch, store_steps=2, sac=None):
    """One seeded iteration with stored steps in chunks of one class; Z, c after the step and the loss."""
    if not grouped:
        monkeypatch.setattr(iteration_module, "render_groups", lambda *a: [slice(None)])
    gen = LD3MGenerator(prior, steps=2, chunk_size=IPC, store_steps=store_steps, sac_min_flops=sac)
    images, labels = real_data.images[real_data.labels < 4], real_data.labels[real_data.labels < 4]
    syn = SyntheticSet.from_real(build_tiny_prior(num_classes=10, image_size=RES, seed=0), images, labels, IPC,
                                 torch.Generator().manual_seed(0))
    syn.Z.data, syn.c.data = syn.Z.data.double(), syn.c.data.double()  # float64: exact comparisons
    noise = gen.draw_noise(len(syn), torch.Generator().manual_seed(3), dtype=torch.float64)
    optimizer = torch.optim.SGD([syn.Z, syn.c], lr=0.1, momentum=0.5)
    ctx = StepContext(real=RealData(real_data.images, real_data.labels, real_data.num_classes), dsa=DSA(),
                      seed=5, iteration=1)
    checked = []
    loss, rendered = distill_iteration(gen, syn, algorithm, ctx, optimizer, noise,
                                       check=lambda loss, grad: checked.append((float(loss), grad.shape)))
    monkeypatch.undo()
    return loss, rendered, syn.Z.detach(), syn.c.detach(), checked


@pytest.mark.parametrize("algorithm", [DM(_network(), batch_real=4), DC(_network(), batch_real=4)],
                         ids=["dm", "dc"])
def test_grouped_iteration_equals_all_at_once(prior, real_data, algorithm, monkeypatch):
    grouped = _iterate(prior, real_data, algorithm, grouped=True, monkeypatch=monkeypatch)
    whole = _iterate(prior, real_data, algorithm, grouped=False, monkeypatch=monkeypatch)
    for a, b in zip(grouped[:4], whole[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(grouped[4]) == 1 and grouped[4][0][1] == whole[4][0][1]  # one check, on every image's gradient
    assert grouped[4][0][0] == pytest.approx(whole[4][0][0], rel=1e-12)


def test_grouped_selective_checkpointing_equals_all_at_once(prior, real_data, monkeypatch):
    dm = DM(_network(), batch_real=4)
    grouped = _iterate(prior, real_data, dm, grouped=True, monkeypatch=monkeypatch, sac=0.0)
    whole = _iterate(prior, real_data, dm, grouped=False, monkeypatch=monkeypatch, sac=0.0)
    for a, b in zip(grouped[:4], whole[:4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_only_one_groups_stored_state_is_live():
    """Simulated: the stored state of DM's class groups is not all live at once (MTT's is)."""
    base = dict(prior="tiny", res=32, ipc=2, steps=2, chunk=2, batch_real=8, width=16, micro_batch=2, syn_steps=2,
                decoder_chunk=1)

    def walk(**settings):
        return Walk.of(planning_config(DistillConfig(**base, **settings)), 4)

    peaks = {}
    for algorithm in ("dm", "mtt"):
        for k in (0, 2):
            peaks[algorithm, k] = estimate(walk(algorithm=algorithm, store_steps=k), direct=True).phase_peaks["distill"]
    kept_dm = peaks["dm", 2] - peaks["dm", 0]
    kept_mtt = peaks["mtt", 2] - peaks["mtt", 0]
    assert stored_together(walk(algorithm="dm")) == 2
    assert stored_together(walk(algorithm="mtt")) == 8
    # MTT keeps 8 images' stored steps, DM one class's 2: about a quarter.
    assert 0.15 * kept_mtt < kept_dm < 0.4 * kept_mtt
