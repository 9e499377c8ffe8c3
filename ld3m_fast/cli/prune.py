"""`ld3m-fast prune DATA --scorer PATH|train --out FILE`: score every real training image.

Writes the per-image losses that pruning ranks by (ld3m_fast/prune.py, docs/pruning.md) to a
safetensors file: `losses` (N,) float32 and `labels` (N,) int64 in the data's order, with the
data's fingerprint and the scorer (description, hash, deviation from the release) in its
metadata. `distill --prune-losses FILE` and `buffer --prune-losses FILE` take them back (checked
against the data: the same number of images, the same labels). The same losses are cached
beside the data cache, so a run with the same data and scorer does not score again.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .._files import check_writable_file, quoted_path, reported_write
from ..bounds import COUNT, SEED
from ..errors import LD3MError
from .distill import add_threads_argument, apply_threads

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..distill.real_networks import REAL_NETWORK_EPOCHS

    parser.add_argument("data", metavar="DATA", help="data folder or 'fashion-mnist' (as `distill --data`)")
    parser.add_argument("--scorer", default="train", metavar="PATH|train",
                        help="a torchvision ResNet-18 state dict (the release scores with ImageNet-pretrained "
                             "weights), or 'train': a ConvNet trained here on the data (default; a deviation "
                             "from the release, recorded in the file)")
    parser.add_argument("--out", required=True, help="the losses file to write (.safetensors)")
    parser.add_argument("--subset", default=None, help="ImageNet subset name or alias")
    parser.add_argument("--res", type=COUNT, required=True, help="image side, as the run's --res")
    parser.add_argument("--max-per-class", type=COUNT, default=None,
                        help="at most N images per class, as the run's --max-per-class (the embedded default: 500)")
    parser.add_argument("--cache-dir", default=None, help="decoded-data cache folder (the losses are cached beside it)")
    parser.add_argument("--scorer-epochs", type=COUNT, default=REAL_NETWORK_EPOCHS,
                        help=f"epochs of the 'train' scorer (default {REAL_NETWORK_EPOCHS})")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the 'train' scorer (default 0, as runs use)")
    parser.add_argument("--device", default="cpu")
    add_threads_argument(parser)


def run(args) -> int:
    from ..data import load_dataset
    from ..distill.setup import resolve_device
    from ..prune import TrainedScorerSettings, build_scorer, losses_for, write_losses

    apply_threads(args)
    out = check_writable_file(args.out, "--out", exists_ok=False, suffix=".safetensors")
    if args.scorer != "train" and not Path(args.scorer).is_file():
        raise LD3MError(f"--scorer {args.scorer} does not exist: give a torchvision ResNet-18 state dict or 'train'")
    device = resolve_device(args.device)
    data = load_dataset(args.data, split="train", subset=args.subset, res=args.res, cache_dir=args.cache_dir,
                        max_per_class=args.max_per_class)
    scorer = build_scorer(args.scorer, res=args.res, num_classes=data.num_classes, subset=args.subset,
                          cache_dir=args.cache_dir,
                          trained=TrainedScorerSettings(epochs=args.scorer_epochs, seed=args.seed))
    losses, meta = losses_for(data, scorer, cache_dir=args.cache_dir, device=device)
    with reported_write(f"--out {quoted_path(out)}"):
        write_losses(out, losses, data.labels, {**meta, "data_description": data.description})
    if meta.get("deviation"):
        logger.info(f"note: {meta['deviation']}")
    logger.info(f"wrote the losses of {len(data)} images ({data.description}; scorer: {meta.get('scorer')}) to "
                f"{out}; use them with `distill --prune-losses {out}`")
    return 0
