"""`ld3m-fast eval RUN_DIR`: train fresh networks on a run's synthetic set, test on real data."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LD3MError
from .distill import add_threads_argument, apply_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished distillation run folder")
    parser.add_argument("--archs", default="convnet,alexnet,vgg11,resnet18,vit",
                        help="comma-separated pool (default: convnet,alexnet,vgg11,resnet18,vit)")
    parser.add_argument("--epochs", type=int, default=1000, help="training epochs (default 1000)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per architecture (default 5)")
    parser.add_argument("--batch", type=int, default=256, help="training batch size (default 256)")
    parser.add_argument("--data", default=None, help="test data (default: the run's --data)")
    parser.add_argument("--max-per-class", type=int, default=None, help="test images per class (default all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dsa", action="store_true", help="train without DSA")
    add_threads_argument(parser)


def run(args) -> int:
    from ..data import load_dataset
    from ..distill.evaluation import EvalConfig, evaluate_synthetic, format_report
    from .._files import write_text_atomic
    from ..distill import load_config, load_final, resolve_device
    from ..networks import parse_arch

    apply_threads(args)
    run_dir = Path(args.run_dir)
    config = load_config(run_dir)
    images, labels, _ = load_final(run_dir)
    archs = tuple(parse_arch(a.strip())[0] for a in args.archs.split(",") if a.strip())
    if not archs or args.epochs < 1 or args.seeds < 1:
        raise LD3MError("--archs must name at least one architecture and --epochs/--seeds be >= 1")
    device = resolve_device(args.device)
    test = load_dataset(args.data or config.data, split="test", subset=config.subset, res=images.shape[-1],
                        cache_dir=config.cache_dir, max_per_class=args.max_per_class)
    eval_config = EvalConfig(archs=archs, epochs=args.epochs, seeds=args.seeds, batch_size=args.batch,
                             width=config.width, depth=config.depth, norm=config.norm,
                             dsa_strategy=None if args.no_dsa else EvalConfig.dsa_strategy)
    result = evaluate_synthetic(images, labels, test.images, test.labels, num_classes=test.num_classes,
                                config=eval_config, seed=args.seed, device=device,
                                progress=lambda a, s, acc: print(f"{a} seed {s}: {100 * acc:.2f}%", flush=True))
    print(format_report(result))
    write_text_atomic(run_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return 0
