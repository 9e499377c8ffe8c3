"""`ld3m-fast buffer`: train ConvNet experts on real data for MTT (one snapshot per epoch)."""
from __future__ import annotations

import argparse
import logging
from .._files import check_writable_folder, quoted_path
from ..bounds import COUNT, POSITIVE, SEED, number
from ..choices import NORMS
from ..errors import LD3MError
from .distill import add_threads_argument, apply_threads
from .settings import argument_type

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..dsa import check_strategy

    parser.add_argument("--data", default="fashion-mnist", help="data folder or 'fashion-mnist' (default)")
    parser.add_argument("--subset", default=None, help="ImageNet subset name or alias")
    parser.add_argument("--res", type=COUNT, required=True, help="image side; must equal the student's --res")
    parser.add_argument("--out", required=True, help="buffer folder to write (expert_XXXX.safetensors)")
    parser.add_argument("--experts", type=COUNT, default=10, help="number of experts (default 10)")
    parser.add_argument("--max-start-epoch", type=COUNT, default=2, help="MTT max start epoch (default 2)")
    parser.add_argument("--expert-epochs", type=COUNT, default=2, help="MTT expert epochs M (default 2)")
    parser.add_argument("--epochs", type=COUNT, default=None,
                        help="training epochs per expert (default: max-start-epoch + expert-epochs, "
                             "the last epoch MTT reads)")
    parser.add_argument("--keep-all-epochs", action="store_true",
                        help="store every epoch, not only those MTT reads")
    parser.add_argument("--lr", type=POSITIVE, default=0.01, help="SGD lr, no momentum (default 0.01)")
    parser.add_argument("--batch", type=COUNT, default=256, help="batch size (default 256)")
    parser.add_argument("--width", type=COUNT, default=128, help="ConvNet width (default 128)")
    parser.add_argument("--depth", type=COUNT, default=None, help="ConvNet depth (default from --res)")
    parser.add_argument("--norm", choices=NORMS, default="instance", help="ConvNet norm (default instance)")
    parser.add_argument("--dsa", type=argument_type(check_strategy), default="color_crop_cutout_flip_scale_rotate",
                        help="DSA strategy or 'none'")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--max-per-class", type=COUNT, default=None)
    add_pruning_arguments(parser)
    add_threads_argument(parser)


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    """The experts train on the pruned real set, as the released buffers do (prune_and_distill
    readme.md:37: --percent=60 --order=asc); the same flags as `distill` (docs/pruning.md)."""
    from ..choices import PRUNE_ORDERS

    parser.add_argument("--prune-percent", type=number(int, minimum=1, maximum=100), default=100,
                        help="keep int(P * n / 100) real images of each class, by --prune-scorer's loss "
                             "(1-100; default 100 = no pruning)")
    parser.add_argument("--prune-order", choices=PRUNE_ORDERS, default="asc",
                        help="asc: the lowest losses (default, the release's), desc: the highest, random: a seeded draw")
    parser.add_argument("--prune-scorer", default="train", metavar="PATH|train",
                        help="a torchvision ResNet-18 state dict, or 'train' (a ConvNet trained on the real data; "
                             "a deviation from the release)")
    parser.add_argument("--prune-losses", default=None, metavar="FILE",
                        help="per-image losses from `ld3m-fast prune` (instead of scoring)")


def run(args) -> int:
    from ..data import load_dataset
    from ..distill.algorithms import NetworkSpec
    from ..distill.buffers import build_buffer
    from ..distill.setup import resolve_device
    from ..prune import PruneSettings, prune_dataset

    apply_threads(args)
    keep = args.max_start_epoch + args.expert_epochs
    epochs = keep if args.epochs is None else args.epochs
    if epochs < keep:
        raise LD3MError(f"--epochs {epochs} is fewer than the {keep} epochs MTT reads "
                        "(max-start-epoch + expert-epochs)")
    out = check_writable_folder(args.out, "--out")
    if out.exists() and any(out.glob("expert_*.safetensors")):
        raise LD3MError(f"--out {quoted_path(out)} already holds a buffer; choose another --out")
    pruning = PruneSettings(args.prune_percent, args.prune_order, args.prune_scorer, args.prune_losses, args.seed)
    pruning.check()
    device = resolve_device(args.device)
    data = load_dataset(args.data, split="train", subset=args.subset, res=args.res,
                        cache_dir=args.cache_dir, max_per_class=args.max_per_class)
    spec = NetworkSpec(num_classes=data.num_classes, res=args.res, width=args.width, depth=args.depth,
                       norm=args.norm)
    spec.build()  # an unknown norm or resolution fails here, before a scorer is trained or anything written
    data, pruned = prune_dataset(data, pruning, subset=args.subset, cache_dir=args.cache_dir, device=device,
                                 min_per_class=1, need="an expert (every class in its training)")
    paths = build_buffer(out, spec, data.images, data.labels, num_experts=args.experts, epochs=epochs,
                         keep_epochs=None if args.keep_all_epochs else keep, lr=args.lr,
                         batch_size=args.batch, dsa_strategy=None if args.dsa == "none" else args.dsa,
                         seed=args.seed, source=str(args.data), subset=args.subset, device=device,
                         pruning=pruned, progress=lambda i, n, p: logger.info(f"expert {i}/{n} -> {p}"))
    logger.info(f"wrote {len(paths)} experts ({epochs} epochs each) to {out}")
    return 0
