"""The learnable synthetic set: one latent Z_i and one class embedding c_i per image."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from ._files import save_tensors_atomic
from .errors import LD3MError
from .normalization import uint8_to_autoencoder
from .priors.prior import Prior

FORMAT = "ld3m-fast-synthetic"


class SyntheticSet(nn.Module):
    """Learnable LD3M synthetic data.

    Z: (N, C, h, w) nn.Parameter, initial latents; c: (N, D) nn.Parameter, class
    embeddings; labels: (N,) long, dataset labels 0..K-1 (class-major order,
    `ipc` images per class). `prior_classes[k]` is the prior's class-table row of
    dataset label k (an ImageNet index for ImageNet subsets).
    """

    def __init__(self, Z: torch.Tensor, c: torch.Tensor, labels: torch.Tensor,
                 prior_classes: list[int] | None = None):
        super().__init__()
        if not (Z.shape[0] == c.shape[0] == labels.shape[0]):
            raise ValueError(f"Z, c and labels must have one row per image, got "
                             f"{Z.shape[0]}, {c.shape[0]}, {labels.shape[0]}")
        self.Z = nn.Parameter(Z.detach().clone())
        self.c = nn.Parameter(c.detach().clone())
        self.register_buffer("labels", labels.detach().clone().long())
        if prior_classes is None:
            prior_classes = range(int(labels.max()) + 1 if labels.numel() else 0)
        self.prior_classes = list(prior_classes)

    def __len__(self) -> int:
        return self.Z.shape[0]

    @property
    def ipc(self) -> int:
        return len(self) // max(len(self.prior_classes), 1)

    @classmethod
    @torch.no_grad()
    def from_real(cls, prior: Prior, images: torch.Tensor, labels: torch.Tensor, ipc: int,
                  generator: torch.Generator, *, prior_classes: list[int] | None = None,
                  batch_size: int = 32, image_size: int | None = None) -> "SyntheticSet":
        """Initialise from `ipc` random real images of every class.

        images: (N, 3, H, W) uint8; labels: (N,) in 0..K-1. Each Z_i is the encoding
        of one real image (fed to the encoder in [-1, 1], resized to `image_size`,
        default the prior's native size); each c_i starts at its class's row of the prior's
        class table. Selection uses `generator` only.
        """
        num_classes = int(labels.max()) + 1
        prior_classes = list(prior_classes) if prior_classes is not None else list(range(num_classes))
        if len(prior_classes) != num_classes:
            raise LD3MError(f"{num_classes} dataset classes but {len(prior_classes)} prior classes given")
        if max(prior_classes) >= prior.num_classes:
            raise LD3MError(f"class index {max(prior_classes)} is outside the prior's "
                            f"{prior.num_classes} classes")
        chosen = []
        for k in range(num_classes):
            members = torch.nonzero(labels == k).flatten()
            if members.numel() < ipc:
                raise LD3MError(f"class {k} has {members.numel()} images, fewer than --ipc {ipc}")
            order = torch.randperm(members.numel(), generator=generator)[:ipc]
            chosen.append(members[order])
        index = torch.cat(chosen)
        size = image_size or prior.image_size
        Z = torch.cat([cls._encode(prior, images[index[i:i + batch_size]], size)
                       for i in range(0, index.numel(), batch_size)])
        new_labels = torch.arange(num_classes).repeat_interleave(ipc)
        rows = torch.tensor(prior_classes)[new_labels]
        c = prior.class_table[rows.to(prior.class_table.device)]
        return cls(Z, c, new_labels, prior_classes)

    @staticmethod
    def _encode(prior: Prior, images_uint8: torch.Tensor, size: int) -> torch.Tensor:
        x = uint8_to_autoencoder(images_uint8).to(prior.device)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return prior.encode(x)

    def save(self, path, metadata: dict | None = None):
        """Write Z, c, labels as safetensors (atomically) with JSON metadata."""
        meta = {"format": FORMAT, "prior_classes": json.dumps(self.prior_classes),
                **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
        save_tensors_atomic({"Z": self.Z, "c": self.c, "labels": self.labels}, path, meta)

    @classmethod
    def load(cls, path, device="cpu") -> "SyntheticSet":
        """Read a file written by `save`; a wrong or damaged file is an LD3MError."""
        path = Path(path)
        if not path.is_file():
            raise LD3MError(f"synthetic set {path} does not exist")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as error:
            raise LD3MError(f"cannot read synthetic set {path}: {error}") from None
        if meta.get("format") != FORMAT or not {"Z", "c", "labels"} <= tensors.keys():
            raise LD3MError(f"{path} is not an ld3m-fast synthetic set")
        return cls(tensors["Z"], tensors["c"], tensors["labels"],
                   json.loads(meta["prior_classes"]))

    @staticmethod
    def read_metadata(path) -> dict:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}
