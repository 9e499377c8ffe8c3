"""The generator and one whole distillation iteration on the embedded default prior (pytest-benchmark).

Both are assembled from a run's config by the one assembler (`build_walked`: what the planner walks,
with real tensors): DM, 10 classes, T=10, guidance 3, the embedded prior's 32², batch_real 64.
"""
from __future__ import annotations

import pytest
import torch

from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.planner.plan import planning_config
from ld3m_fast.distill.planner.simulate import Walk, build_walked
from ld3m_fast.priors import default_prior_path, load_prior


@pytest.fixture(scope="module")
def prior():
    return load_prior(default_prior_path())


def _built(prior, **settings):
    config = planning_config(DistillConfig(prior=str(default_prior_path()), steps=10, batch_real=64, **settings))
    return build_walked(Walk.of(config, 10), prior=prior, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ipc", [1, 10])
@pytest.mark.parametrize("mode", ["recompute", "whole graph"])
def test_generator_render_and_backward(benchmark, prior, ipc, mode):
    built = _built(prior, ipc=ipc, store_steps=10 if mode == "whole graph" else None)
    generator, synthetic, noise = built.iteration.generator, built.synthetic, built.noise
    Z, c = synthetic.Z.detach().requires_grad_(), synthetic.c.detach().requires_grad_()
    benchmark.group = f"generator, IPC {ipc}"

    def run():
        images = generator(Z, c, noise)
        images.backward(torch.ones_like(images))

    benchmark(run)


@pytest.mark.parametrize("ipc", [1, 10])
def test_distillation_iteration(benchmark, prior, ipc):
    built = _built(prior, ipc=ipc)
    benchmark.group = "iteration"
    benchmark(built.run)
