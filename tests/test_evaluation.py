"""Evaluation protocol: the weight average that gets tested, the schedule, and a tiny end-to-end run."""
import itertools

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ld3m_fast.distill.evaluation import (
    EvalConfig,
    corrected_ema_update,
    evaluate_synthetic,
    warmup_cosine,
)
from ld3m_fast.errors import LD3MError
from ld3m_fast.normalization import from_uint8


class WithCounter(nn.Module):
    """A parameter plus an integer buffer, like BatchNorm's num_batches_tracked."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def averaged_over(iterates, decay, multi_avg_fn=None):
    model = WithCounter()
    average = AveragedModel(model, multi_avg_fn=multi_avg_fn or corrected_ema_update(decay), use_buffers=True)
    for step, value in enumerate(iterates, start=1):
        with torch.no_grad():
            model.weight.copy_(value)
            model.steps.fill_(step)
        average.update_parameters(model)
    return average.module


def explicit_corrected_ema(iterates, decay):
    n = len(iterates)
    weights = torch.tensor([decay ** (n - k) for k in range(1, n + 1)], dtype=torch.float64)
    return (weights[:, None] * torch.stack(iterates)).sum(0) / weights.sum()


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_corrected_ema_is_the_normalised_exponential_average(n):
    generator = torch.Generator().manual_seed(n)
    iterates = [torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(n)]
    average = averaged_over(iterates, 0.995)
    torch.testing.assert_close(average.weight.detach(), explicit_corrected_ema(iterates, 0.995))
    assert int(average.steps) == n  # integer buffers follow the network instead of being averaged


def test_short_schedule_forgets_the_first_weights_that_a_plain_ema_keeps():
    # 50 steps from weights 0 to weights 1: the plain EMA keeps 0.995^49 = 78% of the start.
    iterates = [torch.full((3,), float(k > 0), dtype=torch.float64) for k in range(50)]
    corrected = averaged_over(iterates, 0.995).weight.detach()
    assert torch.all(corrected > 0.97)
    plain = averaged_over(iterates, 0.995, multi_avg_fn=get_ema_multi_avg_fn(0.995)).weight.detach()
    assert torch.all(plain < 0.25)


def test_long_schedule_is_the_plain_ema():
    generator = torch.Generator().manual_seed(0)
    iterates = [torch.randn(3, dtype=torch.float64, generator=generator) for _ in range(1500)]
    plain = iterates[0].clone()
    for value in iterates[1:]:
        plain = 0.995 * plain + 0.005 * value
    corrected = averaged_over(iterates, 0.995).weight.detach()
    # they differ by the start's leftover share, 0.995^1499 < 6e-4 of the scale
    torch.testing.assert_close(corrected, plain, atol=2e-3, rtol=0)


def test_warmup_cosine_rises_then_decays_to_zero():
    factor = warmup_cosine(100, 10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    values = [factor(step) for step in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert factor(100) == pytest.approx(0.0, abs=1e-12)


def separable_set(n_per_class, res, generator):
    """Two classes told apart by the sign of the mean brightness: a set any network learns."""
    labels = torch.arange(2).repeat_interleave(n_per_class)
    images = torch.randn(2 * n_per_class, 3, res, res, generator=generator) * 0.3
    images += (labels.float() * 2 - 1)[:, None, None, None]
    return images, labels


def to_uint8(images):
    return ((images.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)


def test_evaluate_synthetic_learns_a_separable_set_deterministically():
    generator = torch.Generator().manual_seed(0)
    images, labels = separable_set(8, 8, generator)
    test_images, test_labels = separable_set(32, 8, generator)
    config = EvalConfig(archs=("convnet",), seeds=2, epochs=30, lr=0.01, width=8, depth=2, dsa_strategy=None)
    train = from_uint8(to_uint8(images))
    first = evaluate_synthetic(train, labels, to_uint8(test_images), test_labels, num_classes=2, config=config)
    again = evaluate_synthetic(train, labels, to_uint8(test_images), test_labels, num_classes=2, config=config)
    assert first == again
    assert first["per_arch"]["convnet"]["mean"] > 0.9
    assert len(first["per_arch"]["convnet"]["accuracies"]) == 2
    assert first["unseen_mean"] is None


def test_evaluate_synthetic_rejects_a_resolution_mismatch():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(LD3MError, match="load the test split at the run's --res"):
        evaluate_synthetic(images, torch.tensor([0, 1]), torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                           torch.tensor([0, 1]), num_classes=2, config=EvalConfig(archs=("convnet",), seeds=1))
