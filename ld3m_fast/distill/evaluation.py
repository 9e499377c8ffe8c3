"""Evaluate a synthetic set: train fresh networks on it, test on the real test split.

Protocol (SPEC §2.5): ConvNet (the distillation architecture) plus the unseen
AlexNet, VGG-11, ResNet-18 and ViT; several seeds each; SGD momentum 0.9,
weight decay 5e-4, lr 1e-3 (VGG-11: 1e-4), linear warm-up then cosine decay per
step, DSA on, and an exponential moving average (0.995) of the weights is what
gets tested, bias-corrected so that a short schedule does not keep the untrained
weights in the average (see `corrected_ema_update`). The reported number is the
accuracy after the last epoch: never a maximum over epochs or checkpoints
measured on the test set.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from ..errors import LD3MError
from ..normalization import from_uint8

DEFAULT_POOL = ("convnet", "alexnet", "vgg11", "resnet18", "vit")
DISTILL_ARCH = "convnet"
ARCH_LR = {"vgg11": 1e-4}


@dataclass
class EvalConfig:
    """Knobs of the evaluation protocol (defaults = SPEC; lower `epochs` to make it cheap)."""

    archs: tuple[str, ...] = DEFAULT_POOL
    seeds: int = 5
    epochs: int = 1000
    lr: float = 1e-3
    arch_lr: dict = field(default_factory=lambda: dict(ARCH_LR))
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.05
    ema_decay: float = 0.995
    batch_size: int = 256
    test_batch_size: int = 512
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate"
    width: int = 128
    depth: int | None = None
    norm: str = "instance"


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr multiplier per optimiser step: linear warm-up to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@torch.no_grad()
def test_accuracy(model, test_images: torch.Tensor, test_labels: torch.Tensor, *, batch_size: int,
                  device) -> float:
    """Top-1 accuracy of `model` on uint8 test images (N, 3, res, res)."""
    model.eval()
    correct = 0
    for start in range(0, test_images.shape[0], batch_size):
        x = from_uint8(test_images[start:start + batch_size]).to(device)
        y = test_labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, test_images.shape[0])


def corrected_ema_update(decay: float):
    """`AveragedModel` update for a bias-corrected EMA: after n updates the average is
    sum_k decay^(n-k) w_k / sum_k decay^(n-k) over the weights w_1..w_n it has seen.

    A plain EMA started from the first weights keeps decay^(n-1) of them: 78% after 50
    optimiser steps at 0.995 (a 50-epoch evaluation on 100 images), which tests an almost
    untrained network. Corrected, the weight of each iterate is the same exponential profile
    normalised to 1; for long schedules (1000 steps: decay^n < 0.01) it is the plain EMA.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        seen = int(num_averaged)  # iterates already in the average (>= 1)
        keep = decay * (1 - decay ** seen) / (1 - decay ** (seen + 1))
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            torch._foreach_lerp_(averaged, current, 1 - keep)
        else:  # integer buffers (BatchNorm's step counter): follow the network
            for mean, value in zip(averaged, current):
                mean.copy_(value)

    return update


def train_and_test(network, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, *, lr: float, config: EvalConfig, generator: torch.Generator,
                   device="cpu") -> float:
    """Train `network` on the synthetic set (images: (N, 3, H, W) float network input)
    and return the test accuracy of its weight EMA after the final epoch."""
    from ..dsa import DSA

    network = network.to(device)
    images, labels = images.to(device), labels.to(device)
    dsa = DSA(config.dsa_strategy) if config.dsa_strategy else None
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, int(config.warmup_fraction * total))))
    ema = AveragedModel(network, multi_avg_fn=corrected_ema_update(config.ema_decay), use_buffers=True)
    network.train()
    for _ in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator).to(device)
        for start in range(0, images.shape[0], config.batch_size):
            index = order[start:start + config.batch_size]
            x = images[index]
            if dsa is not None:
                x = dsa.apply(x, dsa.draw(x.shape[0], generator, x.device))
            loss = F.cross_entropy(network(x), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            ema.update_parameters(network)
    return test_accuracy(ema.module, test_images, test_labels, batch_size=config.test_batch_size,
                         device=device)


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, *, num_classes: int, config: EvalConfig | None = None,
                       seed: int = 0, device="cpu", progress=None) -> dict:
    """Evaluate the synthetic set on every architecture of the pool, `config.seeds` seeds each.

    images: (N, 3, res, res) float32 in the shared normalisation; labels (N,) long;
    test_images: (M, 3, res, res) uint8; test_labels (M,) long.
    Returns {"per_arch": {arch: {"mean", "std", "accuracies"}}, "unseen_mean": float or None,
    "distill_arch": "convnet", "epochs", "seeds"}; accuracies are fractions in [0, 1].
    """
    from .algorithms import NetworkSpec, stream_generator

    config = config or EvalConfig()
    if images.shape[-1] != test_images.shape[-1]:
        raise LD3MError(f"synthetic images are {images.shape[-1]}² but the test images are "
                        f"{test_images.shape[-1]}²; load the test split at the run's --res")
    res = images.shape[-1]
    per_arch = {}
    for arch in config.archs:
        accuracies = []
        for s in range(config.seeds):
            generator = stream_generator(seed, f"eval:{arch}:{s}")
            spec = NetworkSpec(num_classes=num_classes, res=res, arch=arch, width=config.width,
                               depth=config.depth if arch == "convnet" else None,
                               norm=config.norm if arch == "convnet" else None)
            network = spec.build_seeded(generator)
            lr = config.arch_lr.get(arch, config.lr)
            accuracy = train_and_test(network, images, labels, test_images, test_labels, lr=lr,
                                      config=config, generator=generator, device=device)
            accuracies.append(accuracy)
            if progress is not None:
                progress(arch, s, accuracy)
        per_arch[arch] = {
            "mean": statistics.fmean(accuracies),
            "std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
            "accuracies": accuracies,
        }
    unseen = [v["mean"] for a, v in per_arch.items() if a != DISTILL_ARCH]
    return {"per_arch": per_arch, "unseen_mean": statistics.fmean(unseen) if unseen else None,
            "distill_arch": DISTILL_ARCH, "epochs": config.epochs, "seeds": config.seeds}


def format_report(result: dict) -> str:
    """A small table: architecture, mean ± std (percent), seeds."""
    lines = [f"{'arch':<10} {'accuracy (%)':>16}  seeds"]
    for arch, row in result["per_arch"].items():
        mark = "" if arch == result["distill_arch"] else " (unseen)"
        lines.append(f"{arch:<10} {100 * row['mean']:>8.2f} ± {100 * row['std']:<5.2f}  "
                     f"{len(row['accuracies'])}{mark}")
    if result["unseen_mean"] is not None:
        lines.append(f"{'unseen':<10} {100 * result['unseen_mean']:>8.2f}")
    return "\n".join(lines)
