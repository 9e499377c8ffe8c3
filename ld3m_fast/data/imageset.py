"""`ImageSet`: a labelled set of decoded uint8 images held in memory."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ld3m_fast.errors import LD3MError


@dataclass
class ImageSet:
    """Decoded images and their labels.

    images: (N, 3, res, res) uint8, labels: (N,) int64 in [0, num_classes),
    class_names: one name per label. Convert to network input with
    `ld3m_fast.normalization.from_uint8` (the one shared normalisation).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    description: str = ""
    _indices_by_class: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (N,) with N = number of images")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def indices_of_class(self, k: int) -> torch.Tensor:
        """(n_k,) int64 positions of the images with label k, in dataset order."""
        if self._indices_by_class is None:
            self._indices_by_class = [torch.nonzero(self.labels == c).flatten()
                                      for c in range(self.num_classes)]
        return self._indices_by_class[k]

    def by_class(self, k: int) -> torch.Tensor:
        """(n_k, 3, res, res) uint8: all images of class k."""
        return self.images[self.indices_of_class(k)]

    def class_counts(self) -> list[int]:
        return [int(self.indices_of_class(k).numel()) for k in range(self.num_classes)]

    def sample_per_class(self, ipc: int, generator: torch.Generator) -> "ImageSet":
        """`ipc` distinct random images of every class (labels grouped by class, ascending).

        Randomness comes only from `generator`. Raises `LD3MError` when a class has
        fewer than `ipc` images.
        """
        require_per_class(self, ipc)
        chosen = []
        for k in range(self.num_classes):
            members = self.indices_of_class(k)
            order = torch.randperm(members.numel(), generator=generator, device=generator.device)
            chosen.append(members[order[:ipc].cpu()])
        picked = torch.cat(chosen)
        return ImageSet(self.images[picked], self.labels[picked], list(self.class_names),
                        description=f"{ipc} per class from {self.description}".strip())

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at `indices` (same class names)."""
        return ImageSet(self.images[indices], self.labels[indices], list(self.class_names),
                        description=self.description)


def require_per_class(imageset: ImageSet, n: int) -> None:
    """Raise `LD3MError` naming the classes that have fewer than `n` images."""
    counts = imageset.class_counts()
    short = [f"{imageset.class_names[k]} ({c})" for k, c in enumerate(counts) if c < n]
    if short:
        raise LD3MError(f"need at least {n} images per class, but these classes have fewer: "
                        f"{', '.join(short)}; lower the request (e.g. --ipc) or add images")
