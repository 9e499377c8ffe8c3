"""`ImageSet`: a labelled set of decoded uint8 images (memory-mapped when `load_dataset` made it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ld3m_fast.errors import LD3MError


def indices_by_class(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """[(n_k,) int64 positions of label k, ascending] for k < num_classes: what
    `torch.nonzero(labels == k)` gives, from one stable sort instead of a pass per class."""
    order = torch.argsort(labels, stable=True)
    bounds = torch.searchsorted(labels[order], torch.arange(num_classes + 1, dtype=labels.dtype)).tolist()
    return [order[bounds[k]:bounds[k + 1]] for k in range(num_classes)]


@dataclass
class ImageSet:
    """Decoded images and their labels.

    images: (N, 3, res, res) uint8, labels: (N,) int64 in [0, num_classes),
    class_names: one name per label. Convert to network input with
    `ld3m_fast.normalization.from_uint8` (the one shared normalisation).
    classes: the classes this set holds when it is a share of a larger set (a range of
    global class indices: `load_dataset(..., classes=...)`); None: every class. Labels and
    class_names stay global either way.
    rows: for a set read from the data cache, a reader of the same rows by file reads
    (`ld3m_fast.data.cache.RowFile`); `take` uses it, so that what a run samples does not
    stay mapped in its memory. None for sets in memory.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    description: str = ""
    classes: range | None = None
    rows: object | None = field(default=None, repr=False, compare=False)
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
    def held_classes(self) -> range:
        """The classes whose images this set holds."""
        return range(self.num_classes) if self.classes is None else self.classes

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def indices_of_class(self, k: int) -> torch.Tensor:
        """(n_k,) int64 positions of the images with label k, in dataset order."""
        if self._indices_by_class is None:
            self._indices_by_class = indices_by_class(self.labels, self.num_classes)
        return self._indices_by_class[k]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """(len(index), 3, res, res) uint8: the images at `index`, read from the cache file
        when the set has one (nothing stays mapped), else `images[index]`. Same values."""
        return (self.rows if self.rows is not None else self.images)[index]

    def by_class(self, k: int) -> torch.Tensor:
        """(n_k, 3, res, res) uint8: all images of class k."""
        return self.images[self.indices_of_class(k)]

    def class_counts(self) -> list[int]:
        """Images per class, for every class (0 for those a share does not hold)."""
        return [int(self.indices_of_class(k).numel()) for k in range(self.num_classes)]

    def sample_per_class(self, ipc: int, generator: torch.Generator) -> "ImageSet":
        """`ipc` distinct random images of every held class (labels grouped by class, ascending).

        Randomness comes only from `generator`. Raises `LD3MError` when a class has
        fewer than `ipc` images.
        """
        require_per_class(self, ipc)
        chosen = []
        for k in self.held_classes:
            members = self.indices_of_class(k)
            order = torch.randperm(members.numel(), generator=generator, device=generator.device)
            chosen.append(members[order[:ipc].cpu()])
        picked = torch.cat(chosen)
        return ImageSet(self.take(picked), self.labels[picked], list(self.class_names),
                        description=f"{ipc} per class from {self.description}".strip(), classes=self.classes)

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at `indices` (same class names)."""
        return ImageSet(self.images[indices], self.labels[indices], list(self.class_names),
                        description=self.description, classes=self.classes)


def require_per_class(imageset: ImageSet, n: int) -> None:
    """Raise `LD3MError` naming the held classes that have fewer than `n` images."""
    counts = imageset.class_counts()
    short = [f"{imageset.class_names[k]} ({counts[k]})" for k in imageset.held_classes if counts[k] < n]
    if short:
        raise LD3MError(f"need at least {n} images per class, but these classes have fewer: "
                        f"{', '.join(short)}; lower the request (e.g. --ipc) or add images")
