"""The ImageNet subsets used in the dataset-distillation literature, and all of ImageNet-1k.

Each subset is a list of ImageNet-1k class indices in *label order*: label k of the
subset is ImageNet class `imagenet_indices[k]`. The 10-class lists are the ones of SPEC §2.1
(ImageNette/ImageWoof from fast.ai, the others from the MTT/GLaD papers); `imagenet-1k`
is every class, in ImageNet index order (label k = ImageNet class k).

The 1000 wnids in index order ship as `imagenet_wnids.txt` (see
`LICENSE-imagenet-wnids.txt` for where they come from).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from ld3m_fast.errors import LD3MError

_SUBSET_INDICES: dict[str, tuple[int, ...]] = {
    "imagenette": (0, 217, 482, 491, 497, 566, 569, 571, 574, 701),
    "imagewoof": (193, 182, 258, 162, 155, 167, 159, 273, 207, 229),
    "imagefruit": (953, 954, 949, 950, 951, 957, 952, 945, 943, 948),
    "imagemeow": (281, 282, 283, 284, 285, 291, 292, 290, 289, 287),
    "imagesquawk": (84, 130, 88, 144, 145, 22, 96, 9, 100, 89),
    "imageyellow": (309, 986, 954, 951, 987, 779, 599, 291, 72, 11),
    "imagenet-a": (255, 376, 984, 364, 500, 986, 333, 576, 148, 135),
    "imagenet-b": (129, 916, 90, 275, 995, 874, 102, 259, 685, 139),
    "imagenet-c": (565, 94, 554, 535, 92, 392, 291, 136, 324, 11),
    "imagenet-d": (9, 258, 13, 262, 19, 339, 321, 24, 93, 322),
    "imagenet-e": (816, 96, 100, 145, 739, 713, 783, 76, 688, 326),
    "imagenet-1k": tuple(range(1000)),
}

# Names used by earlier code (GLaD/LD3M: `imagenet-fruits`, `imagenet-cats`, ...).
_ALIASES: dict[str, str] = {
    "nette": "imagenette",
    "woof": "imagewoof",
    "fruits": "imagefruit",
    "fruit": "imagefruit",
    "cats": "imagemeow",
    "meow": "imagemeow",
    "birds": "imagesquawk",
    "squawk": "imagesquawk",
    "yellow": "imageyellow",
    **{letter: f"imagenet-{letter}" for letter in "abcde"},
    **{name: "imagenet-1k" for name in ("imagenet", "in1k", "in-1k", "imagenet1k", "imagenet-1000",
                                        "ilsvrc2012", "ilsvrc-2012")},
    **{f"imagenet-{short}": canonical for short, canonical in
       (("fruits", "imagefruit"), ("cats", "imagemeow"), ("birds", "imagesquawk"),
        ("yellow", "imageyellow"), ("nette", "imagenette"), ("woof", "imagewoof"))},
}

SUBSET_NAMES: tuple[str, ...] = tuple(_SUBSET_INDICES)


@dataclass(frozen=True)
class Subset:
    """A named list of ImageNet class indices; position in the list = label."""

    name: str
    imagenet_indices: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.imagenet_indices)

    @property
    def wnids(self) -> list[str]:
        table = imagenet_wnids()
        return [table[i] for i in self.imagenet_indices]

    @property
    def class_names(self) -> list[str]:
        names = imagenet_class_names()
        return [names[i] for i in self.imagenet_indices]


def subset_aliases() -> dict[str, str]:
    """alias -> canonical name."""
    return dict(_ALIASES)


def resolve_subset(name: str) -> Subset:
    """Canonical name or alias (case-insensitive, `_` == `-`) -> `Subset`.

    Raises `LD3MError` listing the valid names for anything else.
    """
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _SUBSET_INDICES:
        valid = ", ".join(SUBSET_NAMES)
        aliases = ", ".join(sorted(_ALIASES))
        raise LD3MError(f"unknown subset {name!r}: use one of {valid} (aliases: {aliases})")
    return Subset(key, _SUBSET_INDICES[key])


@functools.lru_cache(maxsize=1)
def _wnid_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("ld3m_fast.data").joinpath("imagenet_wnids.txt").read_text("utf-8")
    wnids, names = [], []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        wnid, _, lemmas = line.partition("\t")
        wnids.append(wnid.strip())
        # The first lemma is the usual short class name ("tench" for "tench, Tinca tinca").
        names.append(lemmas.split(",")[0].strip() or wnid.strip())
    if len(wnids) != 1000:
        raise RuntimeError(f"imagenet_wnids.txt holds {len(wnids)} wnids, expected 1000")
    return tuple(wnids), tuple(names)


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids; position = class index."""
    return _wnid_table()[0]


def imagenet_class_names() -> tuple[str, ...]:
    """Short human-readable names of the 1000 classes (first WordNet lemma)."""
    return _wnid_table()[1]


@functools.lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}
