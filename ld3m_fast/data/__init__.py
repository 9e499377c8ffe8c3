"""Real data: ImageNet subsets, ImageFolder, CIFAR-10, Fashion-MNIST -> uint8 `ImageSet`s."""
from ld3m_fast.data.imageset import ImageSet, require_per_class
from ld3m_fast.data.loading import default_cache_dir, load_dataset
from ld3m_fast.data.subsets import (
    SUBSET_NAMES,
    Subset,
    imagenet_class_names,
    imagenet_wnids,
    resolve_subset,
    subset_aliases,
)

__all__ = [
    "ImageSet",
    "SUBSET_NAMES",
    "Subset",
    "default_cache_dir",
    "imagenet_class_names",
    "imagenet_wnids",
    "load_dataset",
    "require_per_class",
    "resolve_subset",
    "subset_aliases",
]
