"""The default prior that ships with the package (trained by `ld3m-fast prior train`).

A tiny class-conditional latent diffusion model of Fashion-MNIST at 32x32
(AutoencoderKL 4x8x8 latents + UNet2DModel with a 10 + 1 row class table);
its model card is `docs/default_prior.md`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import PriorError

DEFAULT_PRIOR_RESOURCE = ("assets", "default_prior")


def default_prior_path() -> Path:
    """Filesystem path of the shipped prior folder (pass it to `load_prior`).

    Raises `PriorError` when the package was installed without its data files.
    """
    folder = resources.files("ld3m_fast")
    for part in DEFAULT_PRIOR_RESOURCE:  # one name per joinpath: Python 3.10's Traversable
        folder = folder.joinpath(part)
    path = Path(str(folder))
    if not (path / "ld3m_prior.json").is_file():
        raise PriorError(f"the default prior is missing from the installed package ({path}); "
                         "reinstall ld3m-fast with its package data, or pass --prior DIR")
    return path


def load_default_prior(**kwargs):
    """`load_prior(default_prior_path(), **kwargs)`."""
    from .io import load_prior

    return load_prior(default_prior_path(), **kwargs)
