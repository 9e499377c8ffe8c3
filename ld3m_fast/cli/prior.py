"""`ld3m-fast prior train|import`: make a prior folder.

`prior train --out DIR` trains the tiny class-conditional LDM on Fashion-MNIST and writes a
prior folder that `ld3m_fast.load_prior` reads; optionally a labelled class-conditional sample
grid (`--samples`) and a JSON training report (`--report`) with wall-clock times, losses and
the autoencoder's test-split reconstruction error.

`prior import PIPELINE OUT` writes a diffusers pipeline folder (or a prior file naming one) as a
prior folder, and says where each of its facts was read. `--prior PIPELINE` works without it;
the import is for those who want a folder of ld3m-fast's own format.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import fields
from pathlib import Path

from .._files import check_writable_file, check_writable_folder, quoted_path, reported_write, write_json_atomic
from .._host import cpu_model
from .._threads import check_threads
from ..bounds import COUNT, number
from ..errors import LD3MError
from ..priors.tiny import TINY_SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

# The sample grid's plain DDIM indexes the training schedule: T below its length.
SAMPLE_STEPS_MAXIMUM = TINY_SCHEDULER_CONFIG["num_train_timesteps"] - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="prior_command", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train the tiny default prior on Fashion-MNIST",
                               description=__doc__,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--out", required=True, type=Path, help="prior folder to write")
    train.add_argument("--data", default="fashion-mnist",
                       help="'fashion-mnist' (full set when installed, else the bundled subset), "
                            "or a folder that `load_dataset` reads (10 classes)")
    train.add_argument("--max-per-class", type=COUNT, default=None,
                       help="use only the first N training images of each class")
    add_training_arguments(train)
    train.add_argument("--threads", type=COUNT, default=None,
                       help="torch CPU threads, at most the cores this process may use (default: torch's "
                            "choice; 1 is faster on a busy machine)")
    train.add_argument("--eval-images", type=number(int, minimum=0), default=1000,
                       help="test images for the reconstruction error (0 = skip)")
    train.add_argument("--samples", type=Path, default=None,
                       help="write a class-conditional sample grid PNG here (plain DDIM)")
    train.add_argument("--sample-steps", type=number(int, minimum=1, maximum=SAMPLE_STEPS_MAXIMUM), default=50,
                       help="DDIM steps of the sample grid (below the prior's "
                            f"{SAMPLE_STEPS_MAXIMUM + 1} training timesteps)")
    train.add_argument("--guidance", type=number(float), default=3.0, help="guidance scale of the sample grid")
    train.add_argument("--report", type=Path, default=None, help="write a JSON report here")
    from ..priors.pipeline import PRIOR_FILE_KEYS
    from ..priors.pipeline import __doc__ as pipeline_doc

    keys = "\n".join(f"    {key:<15} {what}" for key, what in PRIOR_FILE_KEYS.items())
    imports = actions.add_parser(
        "import", help="write a diffusers pipeline folder as an ld3m-fast prior folder",
        description=f"{pipeline_doc}\nA prior file's keys:\n\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    imports.add_argument("pipeline", metavar="PIPELINE", type=Path,
                         help="a diffusers pipeline folder (model_index.json), or a prior file (JSON) naming one")
    imports.add_argument("out", metavar="OUT", type=Path, help="prior folder to write")
    imports.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per bounded `PriorTrainingConfig` field: its help, default and bounds come from the field."""
    from ..priors.train import PriorTrainingConfig

    defaults = PriorTrainingConfig()
    for item in fields(PriorTrainingConfig):
        if item.metadata.get("help"):
            bounds = item.metadata["bounds"]
            kind = type(getattr(defaults, item.name))
            parser.add_argument("--" + item.name.replace("_", "-"), default=getattr(defaults, item.name),
                                type=number(kind, minimum=bounds.minimum, maximum=bounds.maximum,
                                            above=bounds.above, below=bounds.below), help=item.metadata["help"])


def run(args: argparse.Namespace) -> int:
    if args.prior_command == "train":
        return _train(args)
    if args.prior_command == "import":
        return _import(args)
    raise LD3MError(f"unknown prior action {args.prior_command!r}: use 'train' or 'import'")


def _import(args: argparse.Namespace) -> int:
    from ..priors.pipeline import import_prior

    source = import_prior(args.pipeline, args.out, force=args.force)
    logger.info(f"imported {source.pipeline or 'ld3m-fast prior'} folder {source.root}"
                + (", each fact read from:" if source.facts else ""))
    width = max((len(fact) for fact, _ in source.facts), default=0)
    for fact, where in source.facts:
        logger.info(f"  {fact:<{width}}  {where}")
    logger.info(f"wrote prior folder {args.out} (use it with --prior {args.out})")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset
    from ..priors import load_prior
    from ..priors.train import (IMAGE_SIZE, PriorTrainingConfig, class_sample_grid,
                                reconstruction_error, save_labelled_grid, train_prior)

    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    config = PriorTrainingConfig(**{item.name: getattr(args, item.name) for item in fields(PriorTrainingConfig)
                                    if item.metadata.get("help")})
    config.check()  # before the data is read
    # Every output, before hours of training.
    check_writable_folder(args.out, "--out")
    for path, flag in ((args.samples, "--samples"), (args.report, "--report")):
        if path is not None:
            check_writable_file(path, flag)
    train_set = load_dataset(args.data, split="train", res=IMAGE_SIZE,
                             max_per_class=args.max_per_class)
    if train_set.num_classes < 2:
        raise LD3MError(f"{args.data} has {train_set.num_classes} class; a class-conditional "
                        "prior needs at least 2")
    started = time.perf_counter()
    report = train_prior(train_set.images, train_set.labels, args.out,
                         class_names=train_set.class_names, config=config,
                         data_description=train_set.description or str(args.data)).to_dict()
    report["total_training_seconds"] = time.perf_counter() - started
    report["machine"] = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    prior = load_prior(args.out)
    if args.eval_images > 0:
        test_set = load_dataset(args.data, split="test", res=IMAGE_SIZE)
        generator = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(len(test_set), generator=generator)[:args.eval_images]
        error = reconstruction_error(prior.encode, prior.decode, test_set.images[pick])
        report["reconstruction_test"] = error
        logger.info(f"autoencoder on {error['images']} test images: MSE {error['mse_pm1']:.5f} "
                    f"(on [-1,1]), {error['mse_01']:.5f} (on [0,1]), PSNR {error['psnr_db']:.2f} dB")
    if args.samples is not None:
        images = class_sample_grid(prior, per_class=10, steps=args.sample_steps,
                                   guidance=args.guidance, seed=args.seed)
        with reported_write(f"--samples {quoted_path(args.samples)}", f"the prior is written to {quoted_path(args.out)}"):
            save_labelled_grid(images, prior.num_classes, prior.class_names
                               or [str(k) for k in range(prior.num_classes)], args.samples)
        logger.info(f"wrote class-conditional samples to {args.samples}")
    if args.report is not None:
        with reported_write(f"--report {quoted_path(args.report)}", f"the prior is written to {quoted_path(args.out)}"):
            write_json_atomic(args.report, report)
        logger.info(f"wrote training report to {args.report}")
    logger.info(f"prior written to {args.out}")
    return 0
