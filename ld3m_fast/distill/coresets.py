"""Coreset baselines: real images chosen per class in a real-trained network's feature space.

DC-BENCH (Cui et al., 2022) compares distilled sets with coresets of the same size per class
besides a random subset; the coreset methods it reports are herding and k-center, in the
feature space of a network trained on the whole real training set (as in Zhao et al., "Dataset
Condensation with Gradient Matching", ICLR 2021, whose baselines DC-BENCH takes over). Here:

- features: `embed(x)` (the penultimate layer) of a network trained on the real train split
  (`ld3m_fast.distill.real_networks.train_real_network`, the distillation ConvNet by default),
  in eval mode, on the uint8 images converted with the shared normalisation;
- herding (Welling, 2009): per class, repeatedly add the image that brings the mean feature of
  the chosen images closest (Euclidean) to the class's mean feature;
- k-center (greedy, Sener & Savarese, 2018): per class, start from one image drawn at random
  (as DeepCore's `k_center_greedy` does; here from the stream `stream_generator(seed,
  "kcenter:<class>")`), then repeatedly add the image farthest from its nearest chosen image.
  At IPC 1 that is the random first image (the image nearest the mean would make it herding).

Ties go to the lower position; a coreset is one set for every eval seed. `herding_positions` /
`kcenter_positions` take plain feature matrices.
"""
from __future__ import annotations

import torch

from ..normalization import from_uint8

CORESET_KINDS = ("herding", "kcenter")
FEATURE_BATCH = 256


def herding_positions(features: torch.Tensor, budget: int) -> list[int]:
    """Herding on (n, F) features: after choosing S, the next is argmin over the rest of
    || (|S| + 1) * mean - sum_S - x_j ||, i.e. the image that moves the chosen mean closest to
    the mean of all n. Returns `min(budget, n)` positions in the order chosen."""
    features = features.double()
    target = features.mean(0)
    chosen: list[int] = []
    available = torch.ones(features.shape[0], dtype=torch.bool)
    total = torch.zeros_like(target)
    for step in range(min(budget, features.shape[0])):
        residual = (step + 1) * target - total
        distance = (features - residual).norm(dim=1)
        distance[~available] = float("inf")
        best = int(torch.argmin(distance))
        chosen.append(best)
        available[best] = False
        total += features[best]
    return chosen


def kcenter_positions(features: torch.Tensor, budget: int, first: int = 0) -> list[int]:
    """Greedy k-center on (n, F) features: the first centre is position `first`, each next one the
    image farthest from its nearest centre. Returns `min(budget, n)` positions in the order chosen."""
    features = features.double()
    n = features.shape[0]
    if budget < 1 or n == 0:
        return []
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(min(budget, n) - 1):
        nearest[chosen] = -1.0
        best = int(torch.argmax(nearest))
        chosen.append(best)
        nearest = torch.minimum(nearest, (features - features[best]).norm(dim=1))
    return chosen


@torch.no_grad()
def embed_images(network, images: torch.Tensor, *, device="cpu", batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(n, F) float32 penultimate features of uint8 images (n, 3, H, W), in eval mode, batch by batch."""
    network.eval()
    parts = [network.embed(from_uint8(images[start:start + batch_size].to(device))).float().cpu()
             for start in range(0, int(images.shape[0]), batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0)


def coreset_indices(kind: str, network, images: torch.Tensor, labels: torch.Tensor, counts: list[int], *,
                    device="cpu", seed: int = 0) -> torch.Tensor:
    """Positions (into images/labels) of `counts[k]` images of every class k chosen by `kind`
    ("herding" or "kcenter") in `network`'s feature space, class by class (only one class's
    features are held at a time), in class order. seed: of k-center's first centres."""
    from .algorithms import stream_generator
    from .evaluation import members_by_class

    chosen = []
    for k, (count, members) in enumerate(zip(counts, members_by_class(labels, len(counts)))):
        if count == 0:
            continue
        features = embed_images(network, images[members], device=device)
        if kind == "herding":
            positions = herding_positions(features, count)
        else:
            first = int(torch.randint(0, members.numel(), (), generator=stream_generator(seed, f"kcenter:{k}")))
            positions = kcenter_positions(features, count, first)
        chosen.append(members[torch.tensor(positions, dtype=torch.long)])
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)


__all__ = ["CORESET_KINDS", "coreset_indices", "embed_images", "herding_positions", "kcenter_positions"]
