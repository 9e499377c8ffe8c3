"""Real data: ImageNet (trees, the flat val folder, subsets), Tiny-ImageNet, ImageFolder,
CIFAR-10/100, Fashion-MNIST -> uint8 `ImageSet`s, through a memory-mapped on-disk cache.

The names load on first use (PEP 562): the decoding worker processes import
`ld3m_fast.data.decode` through this package and must not pay for torch.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "ImageSet": "imageset", "require_per_class": "imageset",
    "default_cache_dir": "loading", "load_dataset": "loading",
    "SUBSET_NAMES": "subsets", "Subset": "subsets", "imagenet_class_names": "subsets",
    "imagenet_wnids": "subsets", "resolve_subset": "subsets", "subset_aliases": "subsets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ld3m_fast.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
