"""Image decoding and geometry: Pillow + numpy for files, torch for in-memory arrays.

One geometry everywhere: resize so the *shorter* side equals `res` (bilinear with
antialiasing), then take the centred `res x res` crop. Grayscale, palette, CMYK and
alpha images become 3-channel RGB; 16-bit grayscale is scaled to 8 bits (Pillow's
own conversion would clip it to white). 32-bit integer images are read when their
values fit in 0..255; floating-point images have no agreed range and are refused.

Decoding an image allocates its full-size pixels and then the resized copy; both sizes
are known from the header, so an image whose decode would need more than
`MAX_DECODE_BYTES` (a 1 x 20,000,000 PNG: under Pillow's bomb limit, but its shorter side
scaled to `res` makes a resize of gigabytes) is refused before any pixel is decoded.

This module imports torch only inside `resize_array_batch`: the decoding worker processes
(`ld3m_fast.data.parallel`) import it and need only Pillow and numpy.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow's own guard stays on; real ImageNet images are far below it.
# Our own: the largest intermediate image one decode may allocate. Pillow's bomb limit admits
# 179 M pixels (537 MB as RGB), so this refuses only shapes whose resize would blow up.
MAX_DECODE_BYTES = 1 << 30
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})


def _shorter_side_size(width: int, height: int, res: int) -> tuple[int, int]:
    """(w, h) scaled so that min(w, h) == res exactly."""
    scale = res / min(width, height)
    if width <= height:
        return res, max(res, round(height * scale))
    return max(res, round(width * scale)), res


def _centre_box(width: int, height: int, res: int) -> tuple[int, int, int, int]:
    left = (width - res) // 2
    top = (height - res) // 2
    return left, top, left + res, top + res


def to_rgb(image: Image.Image) -> Image.Image:
    """PIL image of any mode -> 8-bit RGB. Raises ValueError for modes with no 8-bit reading."""
    if image.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF, PGM): 0..65535 -> 0..255, not clipped.
        wide = np.asarray(image).astype(np.float32)
        image = Image.fromarray(np.rint(wide / 257.0).astype(np.uint8))
    elif image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError("32-bit integer image with values outside 0..255: save it as an "
                             "8- or 16-bit image")
        image = Image.fromarray(values.astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("floating-point image (no agreed value range): save it as an 8- or "
                         "16-bit image")
    return image.convert("RGB")


def resize_center_crop(image: Image.Image, res: int) -> Image.Image:
    """PIL image (any mode) -> RGB `res x res` PIL image (shorter side to res, centre crop)."""
    image = to_rgb(image)
    width, height = image.size
    new_size = _shorter_side_size(width, height, res)
    if new_size != (width, height):
        # Pillow's BILINEAR widens its support when downscaling, i.e. it antialiases.
        image = image.resize(new_size, Image.BILINEAR)
    return image.crop(_centre_box(*image.size, res))


def decode_allocation(width: int, height: int, res: int) -> int:
    """Bytes of the largest image `decode_image_file` allocates for a `width x height` file:
    the decoded pixels (at most 4 bytes each: RGBA, CMYK, 32-bit, 16-bit as float) or the
    copy resized so that its shorter side is `res` (RGB)."""
    resized_width, resized_height = _shorter_side_size(width, height, res)
    return max(width * height * 4, resized_width * resized_height * 3)


def decode_image_file(path: str | Path, res: int) -> np.ndarray:
    """Image file -> (3, res, res) uint8 array. Raises OSError/ValueError if unreadable."""
    with Image.open(path) as image:
        width, height = image.size
        if min(width, height) < 1:
            raise ValueError(f"image of {width}x{height} pixels")
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced DCT scale (1/2, 1/4, 1/8) when the image is
            # much larger than needed; `draft` never goes below the requested size, so the
            # shorter side stays >= res and quality is unaffected at the output size.
            scale = res / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        need = decode_allocation(*image.size, res)
        if need > MAX_DECODE_BYTES:
            raise ValueError(f"{width}x{height} pixels would need {need / 2**30:.1f} GiB to decode and "
                             f"resize to {res}px (at most {MAX_DECODE_BYTES / 2**30:g} GiB per image)")
        image.load()
        cropped = resize_center_crop(image, res)
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1).copy()


def describe_failure(error: BaseException) -> str:
    """One line for why a file could not be decoded."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def decode_files(paths: list[str], res: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode `paths` in order: (rows (n_ok, 3, res, res) uint8, [(position, reason)] of the
    files that failed). Never raises for a bad file: one unreadable image must not stop a
    decode of a million (a worker process runs this; see `ld3m_fast.data.parallel`)."""
    rows = np.empty((len(paths), 3, res, res), dtype=np.uint8)
    kept, failures = 0, []
    for position, path in enumerate(paths):
        try:
            rows[kept] = decode_image_file(path, res)
            kept += 1
        except Exception as error:  # noqa: BLE001 - Pillow raises many types for damaged files
            failures.append((position, describe_failure(error)))
    return rows[:kept], failures


def resize_array_batch(images, res: int, chunk: int = 2048):
    """In-memory images (numpy array or tensor) -> (N, 3, res, res) uint8 tensor with the
    same geometry as files.

    images: (N, H, W) grayscale or (N, 3, H, W) / (N, H, W, 3) uint8. Grayscale is
    replicated to 3 channels. When H == W == res the pixels are returned unchanged.
    """
    import torch
    import torch.nn.functional as F

    batch = torch.as_tensor(np.asarray(images))
    if batch.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {batch.dtype}")
    if batch.dim() == 3:
        batch = batch.unsqueeze(1)
    elif batch.dim() == 4 and batch.shape[-1] == 3 and batch.shape[1] != 3:
        batch = batch.permute(0, 3, 1, 2)
    if batch.dim() != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected (N,H,W), (N,3,H,W) or (N,H,W,3) images, got {tuple(batch.shape)}")
    height, width = int(batch.shape[2]), int(batch.shape[3])
    new_w, new_h = _shorter_side_size(width, height, res)
    left, top, _, _ = _centre_box(new_w, new_h, res)
    out = torch.empty((batch.shape[0], 3, res, res), dtype=torch.uint8)
    for start in range(0, batch.shape[0], chunk):
        part = batch[start:start + chunk]
        if (new_h, new_w) != (height, width):
            resized = F.interpolate(part.float(), size=(new_h, new_w), mode="bilinear",
                                    align_corners=False, antialias=True)
            part = resized.round_().clamp_(0, 255).to(torch.uint8)
        part = part[:, :, top:top + res, left:left + res]
        out[start:start + chunk] = part.expand(-1, 3, -1, -1)
    return out
