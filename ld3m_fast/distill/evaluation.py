"""Evaluate synthetic sets: train fresh networks on them, test on the real test split.

Protocol (SPEC §2.5, `PROTOCOLS["paper"]`): ConvNet (the distillation architecture) plus
the unseen AlexNet, VGG-11, ResNet-18 and ViT; 5 seeds each; 1000 epochs; SGD momentum 0.9,
weight decay 5e-4, lr 1e-3 (VGG-11: 1e-4), linear warm-up then cosine decay per step, DSA
on, and an exponential moving average (0.995) of the weights is what gets tested,
bias-corrected so that a short schedule does not keep the untrained weights in the average
(see `corrected_ema_update`). The reported number is the accuracy after the last epoch:
never a maximum over epochs or checkpoints measured on the test set. `PROTOCOLS["quick"]`
is a CPU-sized protocol beside it (docs/evaluation.md says what it costs and why it is
enough to rank sets).

Structure (so that evaluation can be spread over processes later):

    plan_jobs(set names, config)  -> [EvalJob(set, arch, seed)]   independent jobs
    run_job(job, train set, test) -> {"set", "arch", "seed", "accuracy", "seconds"}
    gather(results, ...)          -> the report: mean ± std per architecture, the unseen
                                     mean, IOR and HLR per set

Every job draws from its own stream, `stream_generator(base_seed, "eval:<arch>:<seed>")`:
the network's initialisation, the shuffles and the DSA draws of a job are a function of
(base seed, arch, seed) only, never of the order the jobs run in or of which process runs
them. The stream does not depend on the set either: every set is trained with the same
networks and the same draws (common random numbers), so differences between sets of the
same size, such as IOR, are paired comparisons.

Beside that default (ours: the final accuracy, hard labels, DSA, a fixed learning rate), the
options of the field's yardstick DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking, commit b8b09664) can be
switched on one by one or together (`PROTOCOLS["ddranking"]`; docs/evaluation.md):

- `report="best"`: the best test accuracy over checkpoints every `best_every` (10) epochs
  (ddranking/metrics/hard_label.py:119, :278-286), labelled as such wherever it appears;
- `baseline_lr="search"`: every baseline set is trained at each rate of DD-Ranking's grid
  (hard_label.py:169) and the best test accuracy is kept, per seed;
- `augment="cutmix"`: DD-Ranking's cutmix (ddranking/aug/cutmix.py), images only;
- `labels="soft"`: every set is also trained on a teacher's logits by KL divergence at a
  temperature (DD-Ranking's soft-label mode "M": the teacher labels each augmented batch,
  ddranking/utils/train_and_eval.py:174-180; loss ddranking/loss/kl.py).

IOR and HLR are means of per-seed (paired) differences, with their std over seeds.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from ..data.imageset import indices_by_class
from ..errors import LD3MError
from ..normalization import from_uint8
from .coresets import CORESET_KINDS

logger = logging.getLogger(__name__)

DEFAULT_POOL = ("convnet", "alexnet", "vgg11", "resnet18", "vit")
DISTILL_ARCH = "convnet"
ARCH_LR = {"vgg11": 1e-4}
LABEL_MODES = ("hard", "soft")
REPORTS = ("final", "best")
AUGMENTS = ("dsa", "cutmix", "none")
BASELINE_LRS = ("fixed", "search")
# Baselines beside the distilled sets: a random real subset, and the coresets of
# `ld3m_fast.distill.coresets` (herding, k-center) in a real-trained network's feature space.
BASELINE_KINDS = ("random",) + CORESET_KINDS
BASELINE_SET_KINDS = ("random-real", "coreset")
# DD-Ranking's learning-rate grid for the baselines (ddranking/metrics/hard_label.py:169,
# soft_label.py:240) and its checkpoint interval (hard_label.py:119).
DDRANKING_LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)
DDRANKING_TEST_INTERVAL = 10
# DD-Ranking's KL temperature as its configurations set it (configs/Demo_LRS_Soft_Label.yaml:55,
# README.md:206); the class's own default is 1.2 (ddranking/loss/kl.py:7).
DDRANKING_TEMPERATURE = 1.0
# Sets smaller than this (bytes) are moved to the device once; larger ones batch by batch.
RESIDENT_BYTES = 256 * 2**20


@dataclass
class EvalConfig:
    """Knobs of the evaluation protocol (defaults = SPEC §2.5, the "paper" protocol)."""

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
    test_per_class: int | None = None   # at most this many test images per class (None: the whole split)
    name: str = "custom"
    # -- DD-Ranking-compatible options (module docstring); the defaults are ours
    labels: str = "hard"                # "soft": also train every set on a teacher's logits
    temperature: float = DDRANKING_TEMPERATURE
    report: str = "final"               # "best": best test accuracy over checkpoints (selection on test)
    best_every: int = DDRANKING_TEST_INTERVAL
    augment: str = "dsa"                # dsa (dsa_strategy) | cutmix | none
    cutmix_beta: float = 1.0            # DD-Ranking's aug_params beta (configs/Demo_LRS_Soft_Label.yaml:19)
    baseline_lr: str = "fixed"          # "search": DD-Ranking's grid for every baseline set
    lr_grid: tuple[float, ...] = DDRANKING_LR_GRID
    baselines: tuple[str, ...] = ("random",)

    def lr_for(self, arch: str) -> float:
        return self.arch_lr.get(arch, self.lr)

    @property
    def label_modes(self) -> tuple[str, ...]:
        """The trainings of every set: hard labels, and soft labels beside them with labels="soft"."""
        return ("hard", "soft") if self.labels == "soft" else ("hard",)

    def label_modes_for(self, kind: str) -> tuple[str, ...]:
        """The full real split is the hard-label reference of HLR: trained with hard labels only."""
        return ("hard",) if kind == "full-real" else self.label_modes

    def checkpoint_epochs(self) -> list[int]:
        """Epochs after which the test accuracy is measured: the last one, and with report="best"
        every `best_every`-th one too (DD-Ranking tests after epochs 10, 20, ...)."""
        if self.report != "best":
            return [self.epochs]
        return sorted(set(range(self.best_every, self.epochs + 1, self.best_every)) | {self.epochs})

    def searches_lr(self, kind: str) -> bool:
        return self.baseline_lr == "search" and kind in BASELINE_SET_KINDS

    def validate(self) -> None:
        """One `LD3MError` line for the first setting out of its range."""
        for name, allowed in (("labels", LABEL_MODES), ("report", REPORTS), ("augment", AUGMENTS),
                              ("baseline_lr", BASELINE_LRS)):
            if getattr(self, name) not in allowed:
                raise LD3MError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        unknown = [b for b in self.baselines if b not in BASELINE_KINDS]
        if unknown:
            raise LD3MError(f"unknown baseline {unknown[0]!r}: use {', '.join(BASELINE_KINDS)}")
        for name in ("seeds", "epochs", "batch_size", "test_batch_size", "best_every"):
            if not getattr(self, name) >= 1:
                raise LD3MError(f"{name} must be >= 1, got {getattr(self, name)}")
        positive = {"lr": self.lr, "temperature": self.temperature, "cutmix_beta": self.cutmix_beta,
                    **{"a rate of lr_grid": v for v in self.lr_grid}}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise LD3MError(f"{name} must be a finite number > 0, got {value}")
        if self.test_per_class is not None and self.test_per_class < 1:
            raise LD3MError(f"test_per_class must be >= 1, got {self.test_per_class}")

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("archs", "lr_grid", "baselines"):
            out[key] = list(getattr(self, key))
        return out


# The two named protocols. "quick" (measured in docs/evaluation.md on a 2-core Xeon, torch
# CPU): the distillation architecture and the cheapest unseen one that learns at 32x32,
# 2 seeds, 50 epochs at the 10x larger learning rate a 50-epoch schedule needs (as in
# docs/reproduction.md), tested on 100 images per class.
# "ddranking" is the paper protocol with DD-Ranking's four choices: best-of-checkpoints, the
# baselines' learning-rate search, cutmix and (always reported) per-seed differences.
PROTOCOLS = {
    "paper": EvalConfig(name="paper"),
    "quick": EvalConfig(name="quick", archs=("convnet", "vgg11"), seeds=2, epochs=50, lr=1e-2,
                        arch_lr={"vgg11": 1e-3}, test_per_class=100),
    "ddranking": EvalConfig(name="ddranking", report="best", baseline_lr="search", augment="cutmix"),
}


def protocol_config(name: str, **overrides) -> EvalConfig:
    """The named protocol's `EvalConfig` with `overrides` (fields of `EvalConfig`); the
    result is named "<protocol>+<changed fields>" when anything differs from the protocol."""
    if name not in PROTOCOLS:
        raise LD3MError(f"unknown protocol {name!r}: use one of {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    config = replace(base, **{"arch_lr": dict(base.arch_lr), **overrides})  # never the table's own dict
    if changed:
        config.name = f"{name}+" + ",".join(sorted(changed))
    config.validate()
    return config


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr multiplier per optimiser step: linear warm-up to 1, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def as_network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels or float network input -> float network input (the shared normalisation)."""
    return from_uint8(images) if images.dtype == torch.uint8 else images


@torch.no_grad()
def test_accuracy(model, test_images: torch.Tensor, test_labels: torch.Tensor, *, batch_size: int,
                  device) -> float:
    """Top-1 accuracy of `model` on uint8 test images (N, 3, res, res), streamed: one batch of
    `batch_size` at a time is moved to `device` and converted there, so the split (memory-mapped
    or not) is never copied whole, nor turned into floats."""
    model.eval()
    correct = 0
    total = int(test_images.shape[0])
    for start in range(0, total, batch_size):
        x = as_network_input(test_images[start:start + batch_size].to(device))
        y = test_labels[start:start + batch_size].to(device)
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, total)


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


# ----------------------------------------------------------------------------- augmentation, labels

def _beta_draw(beta: float, generator: torch.Generator) -> float:
    """One Beta(beta, beta) draw from `generator` (Beta(1, 1) is uniform: no detour)."""
    if beta == 1.0:
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    import numpy as np

    from .._host import draw_int

    return float(np.random.default_rng(draw_int(2**62, generator)).beta(beta, beta))


def cutmix(images: torch.Tensor, generator: torch.Generator, beta: float = 1.0) -> torch.Tensor:
    """DD-Ranking's cutmix (ddranking/aug/cutmix.py:10-34), with explicit randomness: one box for
    the whole batch, of side fractions sqrt(1 - lam) with lam ~ Beta(beta, beta), centred at a
    uniform pixel and clipped, filled from a random permutation of the batch. Labels are not
    mixed (DD-Ranking applies it to the images only, ddranking/utils/train_and_eval.py:174;
    with soft labels the teacher labels the mixed images). images: (B, C, H, W); a new tensor."""
    rows, cols = images.shape[2], images.shape[3]  # its rand_bbox's W = size[2], H = size[3]
    cut = math.sqrt(1.0 - _beta_draw(beta, generator))
    cut_rows, cut_cols = int(rows * cut), int(cols * cut)
    centre = torch.randint(0, rows * cols, (), generator=generator).item()
    cr, cc = centre // cols, centre % cols
    r1, r2 = min(max(cr - cut_rows // 2, 0), rows), min(max(cr + cut_rows // 2, 0), rows)
    c1, c2 = min(max(cc - cut_cols // 2, 0), cols), min(max(cc + cut_cols // 2, 0), cols)
    permutation = torch.randperm(images.shape[0], generator=generator).to(images.device)
    out = images.clone()
    out[:, :, r1:r2, c1:c2] = images[permutation, :, r1:r2, c1:c2]
    return out


def build_augment(config: EvalConfig):
    """x, generator -> augmented x for the protocol's `augment` (None: no augmentation)."""
    if config.augment == "cutmix":
        return lambda x, generator: cutmix(x, generator, config.cutmix_beta)
    if config.augment == "dsa" and config.dsa_strategy:
        from ..dsa import DSA

        dsa = DSA(config.dsa_strategy)
        return lambda x, generator: dsa.apply(x, dsa.draw(x.shape[0], generator, x.device))
    return None


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, averaged over the batch: DD-Ranking's
    KLDivergenceLoss with scale_loss=False (ddranking/loss/kl.py:12-19)."""
    student = F.log_softmax(student_logits / temperature, dim=1)
    teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean")


def _training_step(network, optimizer, augment, images, labels, index, generator, device,
                   teacher=None, temperature: float = DDRANKING_TEMPERATURE) -> None:
    x = as_network_input(images[index].to(device))
    if augment is not None:
        x = augment(x, generator)
    if teacher is None:
        loss = F.cross_entropy(network(x), labels[index].to(device))
    else:  # DD-Ranking's soft-label mode "M": the teacher labels the augmented batch itself
        with torch.no_grad():
            target = teacher(x)
        loss = soft_label_loss(network(x), target, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_network(network, images: torch.Tensor, labels: torch.Tensor, *, lr: float, config: EvalConfig,
                  generator: torch.Generator, device="cpu", on_epoch: Callable[[int], None] | None = None,
                  teacher=None, at_checkpoint: Callable[[int, torch.nn.Module], None] | None = None):
    """Train `network` under the protocol's recipe and return its weight average (EMA module).

    images: (N, 3, H, W) float network input or uint8 pixels (converted batch by batch);
    labels (N,) long. Sets under `RESIDENT_BYTES` move to `device` once, larger ones (a whole
    real train split) one batch at a time. teacher: a network in eval mode whose logits on each
    augmented batch are the targets (soft labels) instead of `labels`.
    on_epoch(e) after each epoch e = 1..epochs; at_checkpoint(e, ema_module) after the epochs
    of `config.checkpoint_epochs()`.
    """
    network = network.to(device)
    if images.numel() * images.element_size() <= RESIDENT_BYTES:
        images, labels = images.to(device), labels.to(device)
    augment = build_augment(config)
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, max(1, int(config.warmup_fraction * total))))
    ema = AveragedModel(network, multi_avg_fn=corrected_ema_update(config.ema_decay), use_buffers=True)
    checkpoints = set(config.checkpoint_epochs()) if at_checkpoint is not None else set()
    for epoch in range(1, config.epochs + 1):
        network.train()
        order = torch.randperm(images.shape[0], generator=generator).to(images.device)
        for start in range(0, images.shape[0], config.batch_size):
            _training_step(network, optimizer, augment, images, labels, order[start:start + config.batch_size],
                           generator, device, teacher, config.temperature)
            schedule.step()
            ema.update_parameters(network)
        if on_epoch is not None:
            on_epoch(epoch)
        if epoch in checkpoints:
            at_checkpoint(epoch, ema.module)
    return ema.module


def train_and_test_detailed(network, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                            test_labels: torch.Tensor, *, lr: float, config: EvalConfig, generator: torch.Generator,
                            device="cpu", on_epoch: Callable[[int], None] | None = None, teacher=None) -> dict:
    """Train, and test the weight average after the epochs of `config.checkpoint_epochs()`.

    Returns {"final_accuracy" (after the last epoch), "best_accuracy" and "best_epoch" (the
    best checkpoint, measured on the test set: DD-Ranking's report), "accuracy" (the one
    `config.report` names)}."""
    curve: dict[int, float] = {}

    def measure(epoch: int, model) -> None:
        curve[epoch] = test_accuracy(model, test_images, test_labels, batch_size=config.test_batch_size,
                                     device=device)
        model.train()

    train_network(network, images, labels, lr=lr, config=config, generator=generator, device=device,
                  on_epoch=on_epoch, teacher=teacher, at_checkpoint=measure)
    best_epoch = max(curve, key=lambda e: (curve[e], -e))  # ties: the earliest, as DD-Ranking's `>`
    final = curve[config.epochs]
    return {"accuracy": curve[best_epoch] if config.report == "best" else final, "final_accuracy": final,
            "best_accuracy": curve[best_epoch], "best_epoch": best_epoch}


def train_and_test(network, images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                   test_labels: torch.Tensor, *, lr: float, config: EvalConfig, generator: torch.Generator,
                   device="cpu", on_epoch: Callable[[int], None] | None = None, teacher=None) -> float:
    """Train `network` on a set and return the test accuracy of its weight EMA that
    `config.report` names: after the final epoch (ours), or the best checkpoint ("best").

    images: (N, 3, H, W) float network input, or uint8 pixels (converted batch by batch, so
    a whole real train split can be used without a float copy); labels (N,) long.
    on_epoch(e) is called after each finished epoch e = 1..config.epochs.
    """
    return train_and_test_detailed(network, images, labels, test_images, test_labels, lr=lr, config=config,
                                   generator=generator, device=device, on_epoch=on_epoch,
                                   teacher=teacher)["accuracy"]


# ----------------------------------------------------------------------------- sets

@dataclass
class EvalSet:
    """One training set under evaluation.

    images: (N, 3, res, res) float network input or uint8 pixels; labels (N,) long.
    kind: "distilled" (an ld3m-fast run), "external" (another method's set),
    "random-real" (the baseline of the same per-class counts), "coreset" (herding or
    k-center, `ld3m_fast.distill.coresets`), "full-real" (the train split).
    baseline: the name of the random-real set it is compared with (IOR), if any;
    baselines: every baseline it is compared with, {kind ("random", "herding", "kcenter"): name}.
    draw: for random-real sets, eval seed -> (images, labels) of that seed's own draw
    (`images`/`labels` are draw 0); None: every seed trains on `images`/`labels`.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    kind: str
    source: str = ""
    baseline: str | None = None
    draw: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    baselines: dict = field(default_factory=dict)

    @property
    def res(self) -> int:
        return int(self.images.shape[-1])

    def training_data(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) that eval seed `seed` trains on."""
        return self.draw(seed) if self.draw is not None else (self.images, self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels.long(), minlength=num_classes).tolist()

    def info(self, num_classes: int) -> dict:
        counts = self.class_counts(num_classes)
        ipc = counts[0] if len(set(counts)) == 1 else None
        baselines = dict(self.baselines)
        if self.baseline is not None:
            baselines.setdefault("random", self.baseline)
        return {"kind": self.kind, "source": self.source, "images": int(self.labels.numel()),
                "ipc": ipc, "class_counts": counts, "baseline": self.baseline, "baselines": baselines}


def check_eval_set(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, res: int | None,
                   what: str) -> None:
    """One-line `LD3MError`s for a set that cannot be evaluated against a test split of
    `num_classes` classes at `res` x `res`."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise LD3MError(f"{what}: images must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise LD3MError(f"{what} has no images")
    if images.shape[-1] != images.shape[-2]:
        raise LD3MError(f"{what}: images are {images.shape[-1]}x{images.shape[-2]}, not square")
    if res is not None and images.shape[-1] != res:
        raise LD3MError(f"{what} is {images.shape[-1]}² but the test images are {res}²: evaluate sets "
                        f"of one resolution together, at that resolution")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise LD3MError(f"{what}: labels must be (N,) class indices with N = {images.shape[0]} images, "
                        f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise LD3MError(f"{what}: labels must be integer class indices, got {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise LD3MError(f"{what}: label {low if low < 0 else high} is out of range for the "
                        f"{num_classes} classes of the test data")
    counts = torch.bincount(labels.long(), minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise LD3MError(f"{what}: class {empty[0]} has no images ({len(empty)} of {num_classes} classes empty)")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise LD3MError(f"{what}: images contain NaN or infinity")


def members_by_class(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per class k, the positions of its images in ascending order (`indices_by_class`, for
    labels of any integer dtype)."""
    return indices_by_class(labels.long(), num_classes)


def random_real_indices(labels: torch.Tensor, counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """Positions of `counts[k]` random images of every class k, class by class, drawn with
    `generator` only (a permutation of each class's members, first counts[k] taken: the
    draw `SyntheticSet.from_real` makes for its initial images)."""
    chosen = []
    for k, (count, members) in enumerate(zip(counts, members_by_class(labels, len(counts)))):
        if members.numel() < count:
            raise LD3MError(f"the real train split has {members.numel()} images of class {k}, fewer than "
                            f"the {count} a random-real baseline of the same size needs")
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:count]])
    return torch.cat(chosen)


def random_real_set(train, counts: list[int], seed: int) -> EvalSet:
    """The random-real baseline for sets with `counts` images per class, drawn from `train`
    (an `ImageSet`): eval seed s trains on its own draw, from the stream
    `stream_generator(seed, "random-real:<counts>:<s>")`, so the baseline's mean ± std is over
    draws as well as networks. (One draw is a poor baseline at IPC 1: two draws of one
    Fashion-MNIST image per class measured 53.2% and 44.4% on ConvNet under the quick protocol.)"""
    from .algorithms import stream_generator

    key = ",".join(str(c) for c in counts)

    def draw(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = random_real_indices(train.labels, counts, stream_generator(seed, f"random-real:{key}:{s}"))
        return train.images[index], train.labels[index]

    balanced = len(set(counts)) == 1
    name = f"random-real-ipc{counts[0]}" if balanced else f"random-real-{key.replace(',', '-')}"
    images, labels = draw(0)
    return EvalSet(name, images, labels, "random-real", draw=draw,
                   source=f"{counts[0] if balanced else key} per class from {train.description}, "
                          "a new draw per eval seed")


def with_random_real_baselines(sets: list[EvalSet], train, *, num_classes: int, seed: int) -> list[EvalSet]:
    """`sets` followed by one random-real baseline per distinct per-class count among them
    (sets of the same counts share one); each set's `baseline` names its own."""
    baselines: dict[tuple, EvalSet] = {}
    for s in sets:
        counts = tuple(s.class_counts(num_classes))
        if counts not in baselines:
            baselines[counts] = random_real_set(train, list(counts), seed)
        s.baseline = baselines[counts].name
        s.baselines["random"] = s.baseline
    return list(sets) + list(baselines.values())


def with_coreset_baselines(sets: list[EvalSet], train, network, *, kinds: Iterable[str], num_classes: int,
                           device="cpu", seed: int = 0) -> list[EvalSet]:
    """One coreset per kind ("herding", "kcenter") and distinct per-class count among `sets`,
    chosen in `network`'s feature space from `train` (an `ImageSet`); each set's `baselines[kind]`
    names its own. Returns the new coreset sets (the same images for every eval seed)."""
    from .coresets import coreset_indices

    made: dict[tuple, EvalSet] = {}
    for s in sets:
        counts = tuple(s.class_counts(num_classes))
        balanced = len(set(counts)) == 1
        size = f"ipc{counts[0]}" if balanced else "-".join(map(str, counts))
        for kind in kinds:
            if (kind, counts) not in made:
                index = coreset_indices(kind, network, train.images, train.labels, list(counts), device=device,
                                        seed=seed)
                made[(kind, counts)] = EvalSet(
                    f"{kind}-{size}", train.images[index], train.labels[index], "coreset",
                    source=f"{kind} coreset, {counts[0] if balanced else size} per class of {train.description}")
            s.baselines[kind] = made[(kind, counts)].name
    return list(made.values())


def read_image_folder_set(folder, *, what: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder-layout set: one subfolder per class of PNG/JPEG/... images.

    Labels: the subfolder names when all are integers ("0", "1", ...), else the position
    of the name in sorted order (torchvision's ImageFolder rule). Images are read as they
    are (RGB, never resized): all must have the same square size.
    Returns (images (N, 3, H, W) uint8, labels (N,) long).
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from ..data.decode import to_rgb
    from ..data.readers import class_subfolders, list_image_files

    folder = Path(folder)
    what = what or str(folder)
    subfolders = class_subfolders(folder)
    if not subfolders:
        raise LD3MError(f"{what} has no class subfolders: give one subfolder of images per class")
    names = [p.name for p in subfolders]
    if all(n.isdigit() for n in names):
        label_of = {n: int(n) for n in names}
    else:
        label_of = {n: i for i, n in enumerate(names)}
    images, labels, size = [], [], None
    for sub in subfolders:
        files = list_image_files(sub)
        if not files:
            raise LD3MError(f"{what}: class folder {sub.name!r} has no images")
        for path in files:
            try:
                with Image.open(path) as image:
                    image.load()
                    pixels = np.asarray(to_rgb(image), dtype=np.uint8)
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
                raise LD3MError(f"{what}: cannot read image {path}: {error}") from None
            if size is None:
                size = pixels.shape[:2]
            elif pixels.shape[:2] != size:
                raise LD3MError(f"{what}: {path.name} is {pixels.shape[1]}x{pixels.shape[0]} but the first "
                                f"image is {size[1]}x{size[0]}: every image of a set must have one size")
            images.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
            labels.append(label_of[sub.name])
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


# Float images beyond this many units of the shared normalisation (|x| > 50 is a pixel
# value of ~12 on the [0, 1] scale) were saved in 0..255, not normalised.
_FLOAT_RANGE_LIMIT = 50.0


def read_safetensors_set(path, *, what: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A safetensors file with `images` and `labels`.

    images: uint8 (N, 3, H, W) pixels (or (N, 1, H, W) grayscale, repeated to RGB), or
    float (N, 3, H, W) in the library's normalisation (`ld3m_fast.normalization`: pixels
    in [0, 1] minus the ImageNet mean, over its std; what `ld3m-fast distill` writes to
    final/images.safetensors). labels: (N,) integer class indices.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    what = what or str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = {"images", "labels"} - keys
            if missing:
                raise LD3MError(f"{what} has no {' or '.join(sorted(missing))} tensor (it has: "
                                f"{', '.join(sorted(keys)) or 'nothing'})")
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError) as error:
        raise LD3MError(f"cannot read {what}: {error}") from None
    if images.dtype == torch.uint8:
        if images.dim() == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
    elif images.is_floating_point():
        if images.dim() == 4 and images.shape[1] == 3 and images.numel() and \
                float(images.abs().max()) > _FLOAT_RANGE_LIMIT:
            raise LD3MError(f"{what}: float images reach {float(images.abs().max()):.0f}, far outside the "
                            "library's normalisation: save 0..255 pixels as uint8, or normalise "
                            "with ld3m_fast.normalization.normalize_unit")
        images = images.float()
    else:
        raise LD3MError(f"{what}: images must be uint8 pixels or float in the library's normalisation, "
                        f"got {images.dtype}")
    return images, labels


def load_eval_set(path, *, name: str | None = None) -> tuple[EvalSet, dict | None]:
    """Read a set to evaluate from `path`: an ld3m-fast run folder (final/images.safetensors),
    an ImageFolder-layout folder, or a safetensors file with `images` and `labels`.

    Returns (set, the run's config as a dict or None). Labels are checked against the test
    data later (`check_eval_set`).
    """
    from .config import load_config
    from .export import load_final

    path = Path(path)
    name = name or path.name or str(path)
    if not path.exists():
        raise LD3MError(f"{path} does not exist: give a run folder, an image folder or a .safetensors file")
    if path.is_dir() and ((path / "final").is_dir() or (path / "config.json").is_file()):
        images, labels, _ = load_final(path)
        config = load_config(path).to_dict()
        return EvalSet(name, images, labels.long(), "distilled", source=str(path)), config
    if path.is_dir():
        images, labels = read_image_folder_set(path, what=name)
        return EvalSet(name, images, labels, "external", source=str(path)), None
    if path.suffix == ".safetensors":
        images, labels = read_safetensors_set(path, what=name)
        return EvalSet(name, images, labels, "external", source=str(path)), None
    raise LD3MError(f"{path} is neither a run folder, an image folder nor a .safetensors file")


# ----------------------------------------------------------------------------- jobs

@dataclass(frozen=True)
class EvalJob:
    """One training run: network `arch`, eval seed `seed` (0-based), trained on set `set`
    with `labels` ("hard", or "soft": a teacher's logits) at learning rate `lr` (None: the
    protocol's rate for `arch`; a rate of the grid for a baseline under baseline_lr="search")."""

    set: str
    arch: str
    seed: int
    labels: str = "hard"
    lr: float | None = None

    @property
    def stream(self) -> str:
        # Not a function of the set, the labels or the rate: all of them train the same networks
        # on the same draws (common random numbers), so their differences are paired.
        return f"eval:{self.arch}:{self.seed}"

    @property
    def key(self) -> tuple:
        return (self.set, self.arch, self.seed, self.labels, self.lr)

    def describe(self) -> str:
        extra = (" soft" if self.labels == "soft" else "") + (f" lr {self.lr:g}" if self.lr is not None else "")
        return f"{self.set} {self.arch} seed {self.seed}{extra}"


def job_rates(kind: str, config: EvalConfig) -> tuple:
    """The learning rates a set of `kind` is trained at: (None,) = the protocol's, or the grid."""
    return tuple(config.lr_grid) if config.searches_lr(kind) else (None,)


def plan_jobs(set_names: Iterable[str], config: EvalConfig, kinds: dict[str, str] | None = None) -> list[EvalJob]:
    """Every (set, arch, seed, labels, lr) of the protocol, seed-major: the first seed of every
    set and architecture comes before any second seed, so a run cut short leaves even tables.
    kinds: {set: kind}, for the baselines' learning-rate search (no search without it)."""
    names = list(set_names)
    kinds = kinds or {}
    return [EvalJob(name, arch, seed, labels, lr) for seed in range(config.seeds) for name in names
            for labels in config.label_modes_for(kinds.get(name, "")) for arch in config.archs
            for lr in job_rates(kinds.get(name, ""), config)]


def assign_jobs(jobs: list[EvalJob], seconds: dict, world_size: int) -> list[list[int]]:
    """Per rank, the indices of the jobs it runs: longest estimated job first, each to the rank
    with the least estimated work so far (every job's result depends only on the job, so any
    assignment gives the same report)."""
    load = [0.0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(jobs)), key=lambda i: (-seconds.get(jobs[i], 0.0), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        assigned[rank].append(i)
        load[rank] += seconds.get(jobs[i], 0.0)
    return [sorted(a) for a in assigned]


def build_eval_network(arch: str, generator: torch.Generator, *, num_classes: int, res: int,
                       config: EvalConfig):
    """The network of one job, initialised from `generator` alone (the draw every caller
    of `NetworkSpec.build_seeded` makes): ConvNet with the config's width/depth/norm, the
    others in their released form for `res` (small below 128, see `ld3m_fast.networks`)."""
    from .algorithms import NetworkSpec

    spec = NetworkSpec(num_classes=num_classes, res=res, arch=arch, width=config.width,
                       depth=config.depth if arch == "convnet" else None,
                       norm=config.norm if arch == "convnet" else None)
    return spec.build_seeded(generator)


def run_job(job: EvalJob, train: EvalSet, test_images: torch.Tensor, test_labels: torch.Tensor, *,
            num_classes: int, config: EvalConfig, seed: int = 0, device="cpu",
            on_epoch: Callable[[int], None] | None = None, teacher=None) -> dict:
    """Train one network of `job` on `train`, test it; a function of (job, seed, sets, teacher) only.

    teacher: the network whose logits are the targets of a soft-label job (eval mode).
    Returns {"set", "arch", "seed", "labels", "lr", "accuracy" (the one `config.report`
    names, a fraction), "final_accuracy", "best_accuracy", "best_epoch", "seconds" (wall)}.
    """
    from .algorithms import stream_generator

    if job.labels == "soft" and teacher is None:
        raise ValueError(f"job {job.describe()} trains on soft labels but no teacher was given")
    started = time.perf_counter()
    images, labels = train.training_data(job.seed)
    generator = stream_generator(seed, job.stream)
    network = build_eval_network(job.arch, generator, num_classes=num_classes, res=train.res, config=config)
    accuracies = train_and_test_detailed(
        network, images, labels, test_images, test_labels, lr=config.lr_for(job.arch) if job.lr is None else job.lr,
        config=config, generator=generator, device=device, on_epoch=on_epoch,
        teacher=teacher if job.labels == "soft" else None)
    return {"set": job.set, "arch": job.arch, "seed": job.seed, "labels": job.labels, "lr": job.lr,
            **accuracies, "seconds": time.perf_counter() - started}


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, population std); std 0 for a single value."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(accuracies_by_arch: dict[str, list[float]]) -> dict:
    """{"per_arch": {arch: {"mean", "std", "accuracies"}}, "unseen_mean"} (unseen = all but ConvNet)."""
    per_arch = {}
    for arch, accuracies in accuracies_by_arch.items():
        if accuracies:
            mean, std = mean_std(accuracies)
            per_arch[arch] = {"mean": mean, "std": std, "accuracies": list(accuracies)}
    unseen = [row["mean"] for arch, row in per_arch.items() if arch != DISTILL_ARCH]
    return {"per_arch": per_arch, "unseen_mean": statistics.fmean(unseen) if unseen else None}


def _selected_accuracies(results: Iterable[dict]) -> tuple[dict, dict, int]:
    """Per (set, labels, arch, seed) the reported accuracy and the learning rate it was trained at:
    where a baseline was trained at several rates (the search), the best one, ties to the
    smaller rate (DD-Ranking keeps the first of its ascending grid on ties, hard_label.py:191).
    Returns (accuracy, rate, number of job results); a job reported twice is an error."""
    by_key: dict[tuple, float] = {}
    for r in results:
        lr = r.get("lr")
        key = (r["set"], r["arch"], int(r["seed"]), r.get("labels", "hard"), None if lr is None else float(lr))
        if key in by_key:
            raise LD3MError(f"job {key} was reported twice")
        by_key[key] = float(r["accuracy"])
    accuracy: dict[tuple, float] = {}
    rate: dict[tuple, float | None] = {}
    for (name, arch, seed, labels, lr), value in sorted(by_key.items(), key=lambda kv: kv[0][4] or 0.0):
        key = (name, labels, arch, seed)
        if key not in accuracy or value > accuracy[key]:
            accuracy[key], rate[key] = value, lr
    return accuracy, rate, len(by_key)


def _table(accuracy: dict, name: str, labels: str, config: EvalConfig) -> dict[str, dict[int, float]]:
    """{arch: {seed: accuracy}} of one set under one kind of labels."""
    return {arch: {s: accuracy[(name, labels, arch, s)] for s in range(config.seeds)
                   if (name, labels, arch, s) in accuracy} for arch in config.archs}


def paired_gaps(mine: dict[str, dict[int, float]], other: dict[str, dict[int, float]], gap) -> dict:
    """Per-seed differences of two sets' accuracies, as DD-Ranking takes them (one difference
    per evaluation run, then mean and std; metrics/hard_label.py:380-381, :411-414).

    mine, other: {arch: {seed: accuracy}}; gap(mine, other) -> difference. Per architecture the
    seeds both have; "unseen": per seed, the gap of the means over the unseen architectures
    both have. Returns {"mean": {arch | "unseen": mean}, "std": {...: population std}}."""
    differences: dict[str, list[float]] = {}
    for arch, values in mine.items():
        common = [s for s in values if s in other.get(arch, {})]
        if common:
            differences[arch] = [gap(values[s], other[arch][s]) for s in common]
    unseen = [a for a in mine if a != DISTILL_ARCH and a in other]
    seeds = sorted({s for a in unseen for s in mine[a]})
    per_seed = []
    for s in seeds:
        archs = [a for a in unseen if s in mine[a] and s in other[a]]
        if archs:
            per_seed.append(gap(statistics.fmean(mine[a][s] for a in archs),
                                statistics.fmean(other[a][s] for a in archs)))
    if per_seed:
        differences["unseen"] = per_seed
    stats = {key: mean_std(values) for key, values in differences.items()}
    return {"mean": {k: m for k, (m, _) in stats.items()}, "std": {k: sd for k, (_, sd) in stats.items()}}


def _baselines_of(info: dict) -> dict[str, str]:
    baselines = dict(info.get("baselines") or {})
    if info.get("baseline"):
        baselines.setdefault("random", info["baseline"])
    return baselines


def gather(results: Iterable[dict], *, config: EvalConfig, sets: dict[str, dict],
           full_real: dict | None = None) -> dict:
    """The report from job results (any order, any subset; duplicates are an error).

    sets: {name: EvalSet.info()} in display order. full_real: {"per_arch": {arch: accuracy},
    "source": ...} given by the user, or None (a "full-real" set among `sets` is used if
    evaluated; its hard-label accuracy is the reference for soft labels too, as in DD-Ranking).
    Per set and kind of labels ("sets": hard, "soft_sets": soft): per_arch (mean ± std over
    seeds), unseen_mean, and for distilled and external sets the gaps, means of per-seed
    differences with their std (`paired_gaps`): ior = acc(set) - acc(random-real baseline),
    hlr = acc(full real) - acc(set), and "improvements" over every baseline (random-real,
    herding, k-center), per architecture and for the unseen mean. A searched baseline's rows
    carry "lr_chosen" (the rate of the grid kept per seed).
    """
    accuracy, rate, done = _selected_accuracies(results)
    expected = sum(len(config.label_modes_for(info["kind"])) * len(config.archs) * config.seeds *
                   len(job_rates(info["kind"], config)) for info in sets.values())
    full_name = next((n for n, info in sets.items() if info["kind"] == "full-real"), None)
    if full_real is not None:
        given = full_real["per_arch"]
        reference = {a: {s: given[a] for s in range(config.seeds)} for a in config.archs if a in given}
    elif full_name is not None:
        reference = _table(accuracy, full_name, "hard", config)
    else:
        reference = None
    out = {}
    for labels in config.label_modes:
        rows = {}
        for name, info in sets.items():
            if labels not in config.label_modes_for(info["kind"]):
                continue
            table = _table(accuracy, name, labels, config)
            row = {**info, **summarize({a: [v[s] for s in sorted(v)] for a, v in table.items()})}
            if config.searches_lr(info["kind"]):
                row["lr_chosen"] = {a: [rate[(name, labels, a, s)] for s in sorted(v)] for a, v in table.items()}
            if info["kind"] in ("distilled", "external"):
                _add_gaps(row, table, _baselines_of(info), accuracy, labels, config, reference)
            rows[name] = row
        out[labels] = rows
    report = {"format": "ld3m-fast-eval", "protocol": config.to_dict(), "complete": done >= expected,
              "jobs_done": done, "jobs_total": expected, "sets": out["hard"]}
    if "soft" in out:
        report["soft_sets"] = out["soft"]
    if full_real is not None:
        report["full_real"] = full_real
    elif full_name is not None:
        report["full_real"] = {"source": "trained", "per_arch": {
            a: row["mean"] for a, row in out["hard"][full_name]["per_arch"].items()}}
    else:
        report["full_real"] = None
    return report


def _add_gaps(row: dict, table: dict, baselines: dict, accuracy: dict, labels: str, config: EvalConfig,
              reference: dict | None) -> None:
    """IOR, HLR and the improvement over every baseline of one set's row (in place)."""
    improvements = {}
    for kind, base in baselines.items():
        base_table = _table(accuracy, base, labels, config)
        if any(base_table.values()):
            gaps = paired_gaps(table, base_table, lambda mine, other: mine - other)
            improvements[base] = {"kind": kind, "gap": gaps["mean"], "std": gaps["std"]}
    if improvements:
        row["improvements"] = improvements
    random_base = improvements.get(baselines.get("random", ""))
    if random_base is not None:
        row["ior"], row["ior_std"] = random_base["gap"], random_base["std"]
    if reference is not None:
        gaps = paired_gaps(table, reference, lambda mine, other: other - mine)
        row["hlr"], row["hlr_std"] = gaps["mean"], gaps["std"]


def evaluate_synthetic(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, *, num_classes: int, config: EvalConfig | None = None,
                       seed: int = 0, device="cpu", progress=None) -> dict:
    """Evaluate one synthetic set on every architecture of the pool, `config.seeds` seeds each.

    images: (N, 3, res, res) float32 in the shared normalisation; labels (N,) long;
    test_images: (M, 3, res, res) uint8; test_labels (M,) long.
    progress(arch, seed, accuracy) is called after each network.
    Returns {"per_arch": {arch: {"mean", "std", "accuracies"}}, "unseen_mean": float or None,
    "distill_arch": "convnet", "epochs", "seeds"}; accuracies are fractions in [0, 1].
    """
    config = config or EvalConfig()
    if images.shape[-1] != test_images.shape[-1]:
        raise LD3MError(f"synthetic images are {images.shape[-1]}² but the test images are "
                        f"{test_images.shape[-1]}²; load the test split at the run's --res")
    train = EvalSet("synthetic", images, labels, "distilled")
    accuracies: dict[str, list[float]] = {arch: [] for arch in config.archs}
    for job in sorted(plan_jobs([train.name], config), key=lambda j: (config.archs.index(j.arch), j.seed)):
        result = run_job(job, train, test_images, test_labels, num_classes=num_classes, config=config,
                         seed=seed, device=device)
        accuracies[job.arch].append(result["accuracy"])
        if progress is not None:
            progress(job.arch, job.seed, result["accuracy"])
    return {**summarize(accuracies), "distill_arch": DISTILL_ARCH, "epochs": config.epochs,
            "seeds": config.seeds}


# ----------------------------------------------------------------------------- cost estimate

@dataclass
class Calibration:
    """Measured wall seconds on this device now: one training step per (arch, batch size),
    one test image per arch, and one teacher forward per image (soft labels)."""

    step_seconds: dict = field(default_factory=dict)   # (arch, batch) -> seconds
    test_seconds_per_image: dict = field(default_factory=dict)  # arch -> seconds
    seconds: float = 0.0   # what the calibration itself took
    teacher_seconds_per_image: float = 0.0

    def epoch_seconds(self, arch: str, images: int, config: EvalConfig) -> float:
        batch = min(images, config.batch_size)
        return self.step_seconds[(arch, batch)] * images / batch

    def job_seconds(self, arch: str, images: int, test_images: int, config: EvalConfig,
                    labels: str = "hard") -> float:
        teacher = self.teacher_seconds_per_image * images if labels == "soft" else 0.0
        tests = len(config.checkpoint_epochs())
        return config.epochs * (self.epoch_seconds(arch, images, config) + teacher) + \
            tests * test_images * self.test_seconds_per_image[arch]


def calibrate(set_sizes: Iterable[int], *, config: EvalConfig, res: int, num_classes: int, device="cpu",
              steps: int = 2, test_images: int = 64, teacher=None) -> Calibration:
    """Time `steps` training steps (after one warm-up) of every architecture at every batch
    size the sets need, augmentation included, a forward pass over `test_images` test-sized
    inputs, and the teacher's forward when given. Uses its own stream ("eval-calibration"):
    the jobs' streams are untouched."""
    from .algorithms import stream_generator

    started = time.perf_counter()
    calibration = Calibration()
    generator = stream_generator(0, "eval-calibration")
    batches = sorted({min(int(n), config.batch_size) for n in set_sizes})
    augment = build_augment(config)
    for arch in config.archs:
        network = build_eval_network(arch, generator, num_classes=num_classes, res=res, config=config).to(device)
        for batch in batches:
            calibration.step_seconds[(arch, batch)] = training_step_seconds(
                network, batch, res, config=config, num_classes=num_classes, generator=generator, device=device,
                steps=steps, augment=augment)
        calibration.test_seconds_per_image[arch] = _forward_seconds(network, test_images, res, generator, device)
    if teacher is not None:
        calibration.teacher_seconds_per_image = _forward_seconds(teacher, min(test_images, config.batch_size), res,
                                                                 generator, device)
    calibration.seconds = time.perf_counter() - started
    return calibration


def training_step_seconds(network, batch: int, res: int, *, config: EvalConfig, num_classes: int,
                          generator: torch.Generator, device="cpu", steps: int = 2, augment=None) -> float:
    """Median wall seconds of one training step of `network` (moved to `device`) on a random
    batch of `batch` images of side `res`, augmentation included (after a warm-up step); the
    network's weights change (a tiny learning rate)."""
    network = network.to(device).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6, momentum=config.momentum)
    images = torch.randn(batch, 3, res, res, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    index = torch.arange(batch)
    augment = build_augment(config) if augment is None else augment
    return _median_seconds(lambda: _training_step(network, optimizer, augment, images, labels, index, generator,
                                                  device), steps, device)


def _median_seconds(step: Callable[[], None], steps: int, device) -> float:
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


@torch.no_grad()
def _forward_seconds(network, count: int, res: int, generator: torch.Generator, device) -> float:
    """Seconds per image of one eval-mode forward over `count` random inputs (after a warm-up)."""
    network.eval()
    x = torch.randn(count, 3, res, res, generator=generator).to(device)
    network(x[:2])
    t = time.perf_counter()
    network(x)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / count


def estimate_seconds(jobs: Iterable[EvalJob], set_sizes: dict[str, int], test_count: int,
                     calibration: Calibration, config: EvalConfig) -> dict[EvalJob, float]:
    """Estimated wall seconds of every job from the calibration."""
    return {job: calibration.job_seconds(job.arch, set_sizes[job.set], test_count, config, job.labels)
            for job in jobs}


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- reports

def format_report(result: dict) -> str:
    """A small table of one `evaluate_synthetic` result: architecture, mean ± std (percent), seeds."""
    lines = [f"{'arch':<10} {'accuracy (%)':>16}  seeds"]
    for arch, row in result["per_arch"].items():
        mark = "" if arch == result["distill_arch"] else " (unseen)"
        lines.append(f"{arch:<10} {100 * row['mean']:>8.2f} ± {100 * row['std']:<5.2f}  "
                     f"{len(row['accuracies'])}{mark}")
    if result["unseen_mean"] is not None:
        lines.append(f"{'unseen':<10} {100 * result['unseen_mean']:>8.2f}")
    return "\n".join(lines)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _pm(value, std) -> str:
    if value is None:
        return "—"
    return f"{100 * value:+.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def accuracy_label(protocol: dict) -> str:
    """What the accuracies of a report are: the final one (ours) or DD-Ranking's best checkpoint."""
    if protocol.get("report") == "best":
        return (f"best test accuracy over checkpoints every {protocol['best_every']} epochs (selected on the "
                "test set, DD-Ranking's report; not the final accuracy)")
    return "test accuracy after the final epoch (no selection on the test set)"


def _protocol_line(report: dict) -> str:
    protocol = report["protocol"]
    archs = protocol["archs"]
    augment = protocol.get("augment", "dsa")
    augmentation = (f"DSA {protocol['dsa_strategy'] or 'off'}" if augment == "dsa" else
                    f"cutmix (beta {protocol['cutmix_beta']:g}, DD-Ranking's)" if augment == "cutmix" else
                    "no augmentation")
    line = (f"Protocol {protocol['name']}: {', '.join(archs)}; {protocol['seeds']} seeds, "
            f"{protocol['epochs']} epochs, lr {protocol['lr']:g}"
            + "".join(f" ({a} {v:g})" for a, v in protocol["arch_lr"].items() if a in archs)
            + f", {augmentation}, EMA {protocol['ema_decay']:g}. Accuracy: {accuracy_label(protocol)}.")
    if protocol.get("baseline_lr") == "search":
        line += (" Baselines: trained at each lr of " + ", ".join(f"{v:g}" for v in protocol["lr_grid"])
                 + " and the best kept per seed (lr searched on the test set, DD-Ranking's grid).")
    test = report.get("test")
    if test:
        line += f" Test: {test['images']} images of {test['source']} at {test['res']}²"
        if test.get("per_class"):
            line += (f", at most {test['per_class']} per class: a quick check, not the full test split")
        line += "."
    return line


def _accuracy_table(rows: dict, archs: list[str]) -> list[str]:
    lines = ["| set | kind | IPC | " + " | ".join(archs) + " | unseen mean |",
             "|---|---|---|" + "---|" * len(archs) + "---|"]
    for name, row in rows.items():
        cells = []
        for arch in archs:
            r = row["per_arch"].get(arch)
            cells.append("—" if r is None else
                         f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={len(r['accuracies'])})")
        ipc = row["ipc"] if row["ipc"] is not None else f"{row['images']} images"
        lines.append(f"| {name} | {row['kind']} | {ipc} | " + " | ".join(cells) + f" | {_pct(row['unseen_mean'])} |")
    return lines


_GAP_NAMES = {"random": "IOR (over {})", "herding": "improvement over {}", "kcenter": "improvement over {}"}


def _gap_table(rows: dict, archs: list[str]) -> list[str]:
    columns = list(archs) + (["unseen"] if any(a != DISTILL_ARCH for a in archs) else [])
    lines = ["| set | gap | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        for base, gap in (row.get("improvements") or {}).items():
            label = _GAP_NAMES.get(gap["kind"], "improvement over {}").format(base)
            lines.append(f"| {name} | {label} | " +
                         " | ".join(_pm(gap["gap"].get(c), gap["std"].get(c)) for c in columns) + " |")
        if "hlr" in row:
            lines.append(f"| {name} | HLR | " + " | ".join(
                _pm(row["hlr"].get(c), row.get("hlr_std", {}).get(c)) for c in columns) + " |")
    return lines if len(lines) > 2 else []


def format_markdown(report: dict) -> str:
    """Markdown tables of a `gather` report: accuracy (%) per set and architecture (mean ± std
    over seeds, n), the unseen mean, then per set its gaps in percentage points, each the mean
    ± std of per-seed differences: IOR and the improvement over every other baseline, and HLR;
    the same for soft labels when the report has them."""
    protocol = report["protocol"]
    archs = protocol["archs"]
    best = protocol.get("report") == "best"
    what = "best-of-checkpoints test accuracy" if best else "test accuracy"
    lines = [_protocol_line(report)]
    if not report["complete"]:
        lines.append(f"Incomplete: {report['jobs_done']} of {report['jobs_total']} jobs finished.")
    gap_note = ("Gaps in percentage points, mean ± std of per-seed differences: IOR = acc(set) − acc(random "
                "real, same IPC), improvement over a coreset = acc(set) − acc(coreset), HLR = acc(full real) − "
                "acc(set)" + (", all of best-of-checkpoints accuracies" if best else "") + ":")
    sections = [("Hard labels" if "soft_sets" in report else None, report["sets"])]
    if "soft_sets" in report:
        teacher = report.get("teacher") or {}
        sections.append((f"Soft labels (teacher {teacher.get('description', '?')}; KL at temperature "
                         f"{protocol['temperature']:g}, DD-Ranking's soft-label protocol; HLR against the "
                         "hard-label full real)", report["soft_sets"]))
    for title, rows in sections:
        lines += [""] + ([f"{title}:", ""] if title else [])
        lines += [f"{what.capitalize()} (%), mean ± std over seeds:", ""] + _accuracy_table(rows, archs)
        gaps = _gap_table(rows, archs)
        if gaps:
            lines += ["", gap_note, ""] + gaps
    chosen = [(n, r["lr_chosen"]) for n, r in report["sets"].items() if r.get("lr_chosen")]
    if chosen:
        lines += ["", "Learning rate kept per seed (search on the test set): " + "; ".join(
            f"{n} " + ", ".join(f"{a} {'/'.join(f'{v:g}' for v in rates)}" for a, rates in by_arch.items())
            for n, by_arch in chosen)]
    full = report.get("full_real")
    if full:
        lines += ["", f"Full real ({full['source']}): " + ", ".join(
            f"{a} {_pct(v)}" for a, v in full["per_arch"].items())]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path) -> bool:
    """Grouped bars: test accuracy per architecture (and the unseen mean), one bar per set,
    error bars = std over seeds. Written atomically; False when matplotlib is missing."""
    from .._files import atomic_write

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    archs = list(report["protocol"]["archs"])
    groups = archs + (["unseen mean"] if any(a != DISTILL_ARCH for a in archs) else [])
    names = list(report["sets"])
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(groups) * max(1, len(names)) ** 0.5 + 4), 4))
    for i, name in enumerate(names):
        row = report["sets"][name]
        xs, means, stds = [], [], []
        for j, group in enumerate(groups):
            if group == "unseen mean":
                value, std = row["unseen_mean"], 0.0
            else:
                r = row["per_arch"].get(group)
                value, std = (None, 0.0) if r is None else (r["mean"], r["std"])
            if value is not None:
                xs.append(j + (i - len(names) / 2 + 0.5) * width)
                means.append(100 * value)
                stds.append(100 * std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=name,
               hatch="//" if row["kind"] in ("random-real", "full-real") else None)
    ax.set_xticks(range(len(groups)), groups)
    test = report.get("test") or {}
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100),
           title=f"protocol {report['protocol']['name']}" + (f", {test['source']} {test['res']}²" if test else ""))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def write_report(report: dict, out_dir, *, plot: bool) -> list[Path]:
    """eval.json, eval.md (and eval.png when `plot`) in `out_dir`, each written atomically."""
    from .._files import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    write_json_atomic(written[0], report)
    write_text_atomic(written[1], format_markdown(report))
    if plot and plot_report(report, out_dir / "eval.png"):
        written.append(out_dir / "eval.png")
    return written


__all__ = [
    "ARCH_LR", "AUGMENTS", "BASELINE_KINDS", "BASELINE_LRS", "BASELINE_SET_KINDS", "Calibration",
    "DDRANKING_LR_GRID", "DDRANKING_TEMPERATURE", "DDRANKING_TEST_INTERVAL", "DEFAULT_POOL", "DISTILL_ARCH",
    "EvalConfig", "EvalJob", "EvalSet", "LABEL_MODES", "PROTOCOLS", "REPORTS", "accuracy_label", "as_network_input",
    "assign_jobs", "build_augment", "build_eval_network", "calibrate", "check_eval_set", "corrected_ema_update",
    "cutmix", "estimate_seconds", "evaluate_synthetic", "format_duration", "format_markdown", "format_report",
    "gather", "job_rates", "load_eval_set", "mean_std", "members_by_class", "paired_gaps", "plan_jobs",
    "plot_report", "protocol_config", "random_real_indices", "random_real_set", "read_image_folder_set",
    "read_safetensors_set", "run_job", "soft_label_loss", "summarize", "test_accuracy", "train_and_test",
    "train_and_test_detailed", "train_network", "training_step_seconds", "warmup_cosine",
    "with_coreset_baselines", "with_random_real_baselines", "write_report",
]
