"""What a run hands over: image grids, the final synthetic set, and reading it back.

final/ (written atomically, as a whole: a temporary folder, then a rename):
    images.safetensors     the rendered images (network input) + labels + the export noise
    images.png             a grid, one row per class
    synthetic.safetensors  the latents Z, class embeddings c and labels (`SyntheticSet.save`)

The export noise comes from its own streams of the run seed (one per class, "export:CLASS"),
so re-rendering the saved latents with the saved noise gives the same images, and any
process can render any class's images (distributed runs render each rank's classes on
that rank and gather them on rank 0, which alone writes).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from .._files import atomic_folder, atomic_write, save_tensors_atomic
from ..errors import LD3MError
from ..normalization import denormalize_unit
from .algorithms import class_noise, class_rows


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Network-input images (B, 3, H, W) -> uint8 (B, 3, H, W), clamped to [0, 255]."""
    return (denormalize_unit(images.detach().float().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)


def save_image_grid(images: torch.Tensor, path, columns: int) -> None:
    """Save network-input images (B, 3, H, W) (or their uint8 pixels, `to_uint8_images`) as one
    PNG, `columns` images per row (atomic)."""
    from PIL import Image

    pixels = images if images.dtype == torch.uint8 else to_uint8_images(images)
    count, _, height, width = pixels.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = torch.zeros(3, rows * (height + 2) + 2, columns * (width + 2) + 2, dtype=torch.uint8)
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = 2 + r * (height + 2), 2 + c * (width + 2)
        grid[:, top:top + height, left:left + width] = pixels[i]
    with atomic_write(path, suffix=".png") as tmp:
        Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(tmp, format="PNG")


@torch.no_grad()
def render_final(setup, seed: int, comm=None):
    """Render the synthetic set of `setup` with the fixed export noise of `seed`.

    Returns (images (N, 3, res, res) float network input, labels (N,), noise). With a
    process group `comm` of several ranks, each renders its own classes and rank 0 gets
    the whole set (the other ranks get None).
    """
    from ..generator import ChainNoise

    syn = setup.synthetic
    rows = None if comm is None or comm.world_size == 1 else class_rows(syn.labels,
                                                                        comm.class_share(len(syn.prior_classes)))
    Z, c, labels = (syn.Z, syn.c, syn.labels) if rows is None else (syn.Z[rows], syn.c[rows], syn.labels[rows])
    noise = class_noise(setup.generator, labels.cpu(), seed, "export")
    images = setup.generator(Z, c, noise.to(setup.device)).cpu()
    if rows is None:
        return images, labels.cpu(), noise
    parts = comm.gather_to_main((images, labels.cpu(), noise.start, noise.steps))
    if parts is None:
        return None
    steps = None if parts[0][3] is None else torch.cat([p[3] for p in parts], dim=1)
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            ChainNoise(torch.cat([p[2] for p in parts]), steps))


def export_final(setup, run_dir, *, seed: int, iteration: int, config: dict, rendered=None) -> Path:
    """Write run_dir/final/: images + labels (safetensors, PNG grid) and the latents.

    rendered: `render_final`'s result when the caller rendered already (distributed runs)."""
    final = Path(run_dir) / "final"
    images, labels, noise = render_final(setup, seed) if rendered is None else rendered
    with atomic_folder(final) as folder:  # a failed export (a full disk) leaves the old final/ or none
        _write_final(folder, setup, images, labels, noise, iteration=iteration, config=config)
    return final


def _write_final(final: Path, setup, images, labels, noise, *, iteration: int, config: dict) -> None:
    tensors = {"images": images, "labels": labels, "noise_start": noise.start}
    if noise.steps is not None:
        tensors["noise_steps"] = noise.steps
    meta = {"format": "ld3m-fast-images", "iteration": str(iteration), "res": str(setup.res),
            "class_names": json.dumps(setup.class_names),
            "normalization": "ld3m_fast.normalization (network input)"}
    save_tensors_atomic(tensors, final / "images.safetensors", meta)
    save_image_grid(images, final / "images.png", setup.synthetic.ipc)
    setup.synthetic.save(final / "synthetic.safetensors", metadata={"iteration": iteration, "config": config})


def load_final(run_dir):
    """(images float (N,3,res,res), labels (N,), metadata) of a finished run's export."""
    path = Path(run_dir) / "final" / "images.safetensors"
    if not path.is_file():
        raise LD3MError(f"{run_dir} has no final export ({path}); finish the run with "
                        f"`ld3m-fast distill --resume {run_dir}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    return images, labels, metadata


__all__ = ["export_final", "load_final", "render_final", "save_image_grid", "to_uint8_images"]
