"""Pruning the real data before distilling, as the authors' follow-up releases it.

The released repository (github.com/Brian-Moser/prune_and_distill at d6912268, the code of
"Distill the Best, Ignore the Rest") distils every run from a pruned real set:

- `get_losses_imagenet.py` scores every training image with an ImageNet-pretrained
  torchvision ResNet-18 (line 14) in eval mode (:16), resized to 224x224 and ImageNet-
  normalised (:22-26), batch 1 (:31), by its cross-entropy (:19, :41);
- per class it sorts by loss, ascending (:50; Python's sort is stable), and keeps the first
  (`asc`, :55) or the last (`desc`, :56) `int(percent * n / 100)` images (:54);
- `src/glad_utils.py: build_dataset` (:24-51) keeps the images in those lists, in dataset
  order, and everything at `--percent 100` (:51); `src/shared_args.py:6-7` holds the flags.

Here: `prune_indices` is that rule (plus `order="random"`: a seeded draw per class from the
stream `stream_generator(seed, "prune:random:<class>")`); the scorers are a torchvision-layout
ResNet-18 read from a local file (`ResNet18FileScorer`, evaluated as the release does; in
eval mode every image's loss is independent of its batch, so batches of `SCORE_BATCH` give the
batch-1 losses up to float rounding) or a ConvNet trained here on the real data
(`TrainedScorer`: for data without a pretrained scorer; a deviation from the release, recorded
as such). Losses are computed once per (data, scorer), with a progress bar, and cached beside
the data cache; `ld3m-fast prune` writes them to a file that `--prune-losses` takes back.

Two differences from the release, both recorded in docs/pruning.md: the scorer sees the
decoded data (shorter side resized to --res, centre-cropped) resized to 224x224 rather than
the original JPEG squashed to 224x224; and a class whose `int()` rounds to fewer images than
the run needs is refused in one line (the release keeps an empty list for `asc` and, through
`losses[-0:]`, the whole class for `desc`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ._files import save_tensors_atomic, user_cache_dir
from .choices import PRUNE_ORDERS
from .distill.real_networks import REAL_NETWORK_EPOCHS
from .errors import LD3MError

logger = logging.getLogger(__name__)

LOSSES_FORMAT = "ld3m-fast-prune-losses"
SCORE_BATCH = 64
RELEASED = "prune_and_distill get_losses_imagenet.py"


def kept_count(n: int, percent: int) -> int:
    """Images a class of `n` keeps at `percent`: the released `int(percent * n / 100)`
    (get_losses_imagenet.py:54), float division and truncation included."""
    return int(percent * n / 100)


def prune_indices(losses: torch.Tensor | None, labels: torch.Tensor, num_classes: int, percent: int, order: str,
                  *, seed: int = 0) -> torch.Tensor:
    """Positions of the images that survive, ascending (dataset order, as build_dataset keeps them).

    losses: (N,) per-image losses (unused, may be None, for order="random"); labels: (N,) in
    [0, num_classes). Per class of n images: a stable ascending sort by loss (ties keep dataset
    order), then the first `kept_count(n, percent)` (asc) or the last (desc) of it; "random"
    draws them from `stream_generator(seed, f"prune:random:{k}")`. percent 100 keeps every image.
    """
    from .data.imageset import indices_by_class
    from .distill.algorithms import stream_generator

    check_prune_settings(percent, order)
    kept = []
    for k, members in enumerate(indices_by_class(labels.long(), num_classes)):
        keep = kept_count(members.numel(), percent)
        if order == "random":
            chosen = members[torch.randperm(members.numel(), generator=stream_generator(seed, f"prune:random:{k}"))[:keep]]
        else:
            ranked = members[torch.sort(losses[members], stable=True).indices]
            chosen = ranked[:keep] if order == "asc" else ranked[ranked.numel() - keep:]
        kept.append(chosen)
    return torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)


def check_prune_settings(percent, order: str) -> None:
    """One-line `LD3MError`s for a percent outside 1..100 or an unknown order."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise LD3MError(f"--prune-percent must be an integer from 1 to 100 (100 = no pruning), got {percent!r}")
    if order not in PRUNE_ORDERS:
        raise LD3MError(f"unknown --prune-order {order!r}; choose {', '.join(PRUNE_ORDERS)}")


def smallest_percent(class_sizes: list[int], need: int) -> int | None:
    """The smallest percent at which every class keeps at least `need` images (None: none does)."""
    for percent in range(1, 101):
        if all(kept_count(n, percent) >= need for n in class_sizes):
            return percent
    return None


# ----------------------------------------------------------------------------- scorers

class Scorer:
    """What gives every real image a loss. key: identity for the loss cache (known before
    scoring); scorer_hash: the model's identity, recorded by the run; deviation: why this is
    not the released scorer (None for the released kind)."""

    description: str = ""
    deviation: str | None = None

    def key(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, data, *, device) -> None:
        """Load or train the model (after the loss cache missed)."""

    def scorer_hash(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def losses(self, images: torch.Tensor, labels: torch.Tensor, device) -> torch.Tensor:  # pragma: no cover
        """(n,) float32 losses of uint8 images (n, 3, H, W) with dataset labels (n,)."""
        raise NotImplementedError


class ResNet18FileScorer(Scorer):
    """The released scorer: a torchvision ResNet-18 (ImageNet weights in the release,
    get_losses_imagenet.py:14) from a local state dict, in eval mode, on images resized to
    224x224 (bilinear, antialiased) in ImageNet normalisation, by cross-entropy over all its
    classes against each image's class (for a 1000-class model and an ImageNet subset: the
    subset's ImageNet index)."""

    def __init__(self, path, *, num_classes: int, subset: str | None):
        from .distill.real_networks import file_sha256

        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        self.num_classes, self.subset = num_classes, subset
        self.model = None
        self.description = f"torchvision ResNet-18 {self.path.name} (sha256 {self.sha256[:12]}) at 224²"

    def key(self) -> str:
        return f"torchvision-resnet18:{self.sha256}:{self.subset}"

    def scorer_hash(self) -> str:
        return f"sha256:{self.sha256}"

    def prepare(self, data, *, device) -> None:
        from .distill.real_networks import imagenet_rows
        from .networks import load_torchvision_resnet18

        self.model = load_torchvision_resnet18(self.path).to(device)
        self.targets = torch.tensor(imagenet_rows(self.model.fc.out_features, self.num_classes, self.subset,
                                                  str(self.path)), dtype=torch.long)

    @torch.no_grad()
    def losses(self, images, labels, device):
        from .distill.real_networks import IMAGENET_SIDE
        from .normalization import normalize_unit

        x01 = images.to(device).float() / 255.0  # ToTensor (get_losses_imagenet.py:24)
        x01 = F.interpolate(x01, size=(IMAGENET_SIDE, IMAGENET_SIDE), mode="bilinear", align_corners=False,
                            antialias=True)      # Resize((224, 224)) (:23)
        logits = self.model(normalize_unit(x01))  # Normalize(ImageNet mean, std) (:25)
        return F.cross_entropy(logits.float(), self.targets[labels].to(device), reduction="none").cpu()


@dataclass(frozen=True)
class TrainedScorerSettings:
    """The ConvNet `--prune-scorer train` trains on the (unpruned) real data: the run's
    resolution and classes, ConvNet width 128 of the resolution's depth, instance norm, the
    evaluation recipe for `epochs` epochs, seed 0 whatever the run's seed (so that runs of
    several seeds prune alike, as the release's one scorer does)."""

    epochs: int = REAL_NETWORK_EPOCHS
    width: int = 128
    seed: int = 0


class TrainedScorer(Scorer):
    deviation = ("a ConvNet trained by ld3m-fast on the real data scores the images; the release scores "
                 f"them with an ImageNet-pretrained ResNet-18 ({RELEASED}:14)")

    def __init__(self, settings: TrainedScorerSettings, *, res: int, num_classes: int, cache_dir=None):
        from .distill.real_networks import RealNetworkSpec

        self.spec = RealNetworkSpec(res=res, num_classes=num_classes, width=settings.width,
                                    epochs=settings.epochs, seed=settings.seed).resolved()
        self.cache_dir = cache_dir
        self.network = None
        self.description = f"{self.spec.describe()} (ld3m-fast's scorer, not the release's)"
        self._hash = None

    def key(self) -> str:
        return f"trained:{json.dumps(asdict(self.spec), sort_keys=True)}"

    def prepare(self, data, *, device) -> None:
        from .distill.real_networks import imageset_fingerprint, train_real_network

        self.network, info = train_real_network(data.images, data.labels, self.spec,
                                                data_key=imageset_fingerprint(data), cache_dir=self.cache_dir,
                                                device=device)
        self._hash = f"sha256:{info['sha256']}"

    def scorer_hash(self) -> str:
        return self._hash

    @torch.no_grad()
    def losses(self, images, labels, device):
        from .normalization import from_uint8

        logits = self.network(from_uint8(images.to(device)))
        return F.cross_entropy(logits.float(), labels.to(device), reduction="none").cpu()


def build_scorer(text: str, *, res: int, num_classes: int, subset: str | None, cache_dir=None,
                 trained: TrainedScorerSettings = TrainedScorerSettings()) -> Scorer:
    """`--prune-scorer`: "train" or the path of a torchvision-layout ResNet-18 state dict."""
    if text == "train":
        return TrainedScorer(trained, res=res, num_classes=num_classes, cache_dir=cache_dir)
    if not Path(text).is_file():
        raise LD3MError(f"--prune-scorer {text} does not exist: give a torchvision ResNet-18 state dict "
                        "(.pth or .safetensors) or 'train'")
    return ResNet18FileScorer(text, num_classes=num_classes, subset=subset)


# ----------------------------------------------------------------------------- losses

def score(scorer: Scorer, data, *, device="cpu", batch_size: int = SCORE_BATCH) -> torch.Tensor:
    """(N,) float32 losses of every image of `data` (an `ImageSet`), batch by batch with a
    progress bar; the model must be prepared."""
    from tqdm import tqdm

    parts = []
    total = len(data)
    with tqdm(total=total, desc="scoring the real images", unit="img", leave=False, disable=None) as bar:
        for start in range(0, total, batch_size):
            parts.append(scorer.losses(data.images[start:start + batch_size], data.labels[start:start + batch_size],
                                       device).float())
            bar.update(parts[-1].numel())
    losses = torch.cat(parts) if parts else torch.zeros(0)
    if not torch.isfinite(losses).all():
        raise LD3MError(f"the scorer ({scorer.description}) gives non-finite losses: check its weights")
    return losses


def write_losses(path, losses: torch.Tensor, labels: torch.Tensor, metadata: dict) -> None:
    """A losses file: tensors `losses` (N,) float32 and `labels` (N,) int64, with metadata."""
    save_tensors_atomic({"losses": losses.float(), "labels": labels.long()}, path,
                        {"format": LOSSES_FORMAT, **{k: v for k, v in metadata.items() if v is not None}})


def read_losses(path, data, *, what: str = "--prune-losses") -> tuple[torch.Tensor, dict]:
    """The losses of a file written by `ld3m-fast prune` (or the cache), checked against `data`:
    the same number of images and the same label for every one. Returns (losses, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise LD3MError(f"{what} {path} does not exist; write one with `ld3m-fast prune DATA --out FILE`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != LOSSES_FORMAT or not {"losses", "labels"} <= set(f.keys()):
                raise LD3MError(f"{what} {path} is not an ld3m-fast losses file (write one with `ld3m-fast prune`)")
            losses, labels = f.get_tensor("losses").float(), f.get_tensor("labels").long()
    except (SafetensorError, OSError) as error:
        raise LD3MError(f"cannot read {what} {path}: {error}") from None
    if losses.shape != (len(data),) or labels.shape != (len(data),):
        raise LD3MError(f"{what} {path} holds the losses of {losses.numel()} images but the data has {len(data)}: "
                        "score the same --data, --subset and --max-per-class")
    mismatch = torch.nonzero(labels != data.labels).flatten()
    if mismatch.numel():
        i = int(mismatch[0])
        raise LD3MError(f"{what} {path} does not belong to this data: image {i} has label {int(labels[i])} there "
                        f"and {int(data.labels[i])} here ({mismatch.numel()} labels differ)")
    if not torch.isfinite(losses).all():
        raise LD3MError(f"{what} {path} holds non-finite losses")
    return losses, meta


def losses_cache_dir(cache_dir=None) -> Path:
    """Beside the data cache: `<cache_dir>/prune`, or `user_cache_dir("prune")`."""
    return Path(cache_dir).expanduser() / "prune" if cache_dir else user_cache_dir("prune")


def losses_for(data, scorer: Scorer, *, cache_dir=None, device="cpu") -> tuple[torch.Tensor, dict]:
    """Per-image losses of `data` under `scorer`: from the cache (keyed to the data's fingerprint
    and the scorer's key), or computed now and cached. Returns (losses, metadata)."""
    from .distill.real_networks import imageset_fingerprint

    data_key = imageset_fingerprint(data)
    digest = hashlib.sha256(json.dumps([data_key, scorer.key()]).encode()).hexdigest()[:24]
    path = losses_cache_dir(cache_dir) / f"losses-{digest}.safetensors"
    if path.is_file():
        try:
            losses, meta = read_losses(path, data, what="cached losses")
            logger.info(f"per-image losses ({meta.get('scorer', scorer.description)}): cached at {path}")
            return losses, meta
        except LD3MError as error:
            logger.warning("ignoring the cached losses %s (%s); scoring again", path, error)
    scorer.prepare(data, device=device)
    logger.info(f"scoring {len(data)} real images with {scorer.description}; cached afterwards at {path}")
    losses = score(scorer, data, device=device)
    meta = {"format": LOSSES_FORMAT, "data": data_key, "data_description": data.description,
            "scorer": scorer.description, "scorer_hash": scorer.scorer_hash(), "deviation": scorer.deviation,
            "count": str(len(data)), "num_classes": str(data.num_classes)}
    try:
        write_losses(path, losses, data.labels, meta)
    except OSError as error:  # a read-only cache costs the next start only
        logger.warning("could not cache the losses at %s: %s", path, error)
    return losses, {k: v for k, v in meta.items() if v is not None}


# ----------------------------------------------------------------------------- applying it

@dataclass(frozen=True)
class PruneSettings:
    """The pruning of one run (or buffer): the DistillConfig fields prune_*."""

    percent: int = 100
    order: str = "asc"
    scorer: str = "train"
    losses: str | None = None
    seed: int = 0  # the stream of order="random"

    @classmethod
    def from_config(cls, config) -> "PruneSettings":
        return cls(config.prune_percent, config.prune_order, config.prune_scorer, config.prune_losses, config.seed)

    def check(self) -> None:
        """Every setting in range, the files present: before anything is loaded or written."""
        check_prune_settings(self.percent, self.order)
        if self.percent == 100 or self.order == "random":
            return
        if self.losses is not None:
            if not Path(self.losses).is_file():
                raise LD3MError(f"--prune-losses {self.losses} does not exist; write one with "
                                "`ld3m-fast prune DATA --out FILE`")
        elif not isinstance(self.scorer, str) or not self.scorer:
            raise LD3MError("--prune-scorer must be 'train' or the path of a ResNet-18 state dict")
        elif self.scorer != "train" and not Path(self.scorer).is_file():
            raise LD3MError(f"--prune-scorer {self.scorer} does not exist: give a torchvision ResNet-18 state "
                            "dict (.pth or .safetensors) or 'train'")


def pruning_losses(data, settings: PruneSettings, *, subset: str | None = None, cache_dir=None, device="cpu",
                   trained: TrainedScorerSettings = TrainedScorerSettings(),
                   scorer: Scorer | None = None) -> tuple[torch.Tensor | None, dict]:
    """The per-image losses `settings` ranks by (None for order "random" or percent 100) and a
    record of where they come from: percent, order, scorer, scorer_hash, deviation."""
    settings.check()
    record = {"percent": settings.percent, "order": settings.order}
    if settings.percent == 100:
        return None, {"percent": 100}
    if settings.order == "random":
        record["scorer"] = f"none: a seeded random draw (stream prune:random:<class>, seed {settings.seed})"
        return None, record
    if settings.losses is not None:
        losses, meta = read_losses(settings.losses, data)
        record["losses_file"] = str(settings.losses)
    else:
        scorer = scorer or build_scorer(settings.scorer, res=data.resolution, num_classes=data.num_classes,
                                        subset=subset, cache_dir=cache_dir, trained=trained)
        losses, meta = losses_for(data, scorer, cache_dir=cache_dir, device=device)
    record.update(scorer=meta.get("scorer", "unknown"), scorer_hash=meta.get("scorer_hash"),
                  deviation=meta.get("deviation"))
    return losses, {k: v for k, v in record.items() if v is not None}


def apply_pruning(data, losses: torch.Tensor | None, settings: PruneSettings, record: dict, *,
                  min_per_class: int = 1, need: str = "one image per class"):
    """(`data` keeping the images of `prune_indices`, `record` with "kept_per_class"). A class left
    with fewer than `min_per_class` images (`need` says what for) is a one-line `LD3MError`."""
    if settings.percent == 100:
        return data, record
    keep = prune_indices(losses, data.labels, data.num_classes, settings.percent, settings.order, seed=settings.seed)
    kept = torch.bincount(data.labels[keep], minlength=data.num_classes).tolist()
    _refuse_short_classes(data, kept, settings.percent, min_per_class, need)
    if record.get("deviation"):
        logger.info(f"pruning: deviation from the release: {record['deviation']}")
    logger.info(f"pruning: kept {len(keep)} of {len(data)} real images ({settings.percent}% per class, "
                f"{settings.order}; scorer: {record['scorer']})")
    pruned = data.subset(keep)
    pruned.description = f"{data.description}, pruned to {settings.percent}% per class ({settings.order})"
    return pruned, {**record, "kept_per_class": kept}


def prune_dataset(data, settings: PruneSettings, *, subset: str | None = None, cache_dir=None, device="cpu",
                  min_per_class: int = 1, need: str = "one image per class",
                  trained: TrainedScorerSettings = TrainedScorerSettings(), scorer: Scorer | None = None):
    """`data` (an `ImageSet`) pruned by `settings`: (the kept `ImageSet`, a record of what was
    done: percent, order, scorer, scorer_hash, deviation, kept per class). A class left with
    fewer than `min_per_class` images (`need` says what for) is a one-line `LD3MError`.
    scorer: a `Scorer` to use instead of the one `settings.scorer` names (Python callers)."""
    losses, record = pruning_losses(data, settings, subset=subset, cache_dir=cache_dir, device=device,
                                    trained=trained, scorer=scorer)
    return apply_pruning(data, losses, settings, record, min_per_class=min_per_class, need=need)


def _refuse_short_classes(data, kept: list[int], percent: int, min_per_class: int, need: str) -> None:
    short = [k for k, count in enumerate(kept) if count < min_per_class]
    if not short:
        return
    sizes = data.class_counts()
    k = short[0]
    fix = smallest_percent(sizes, min_per_class)
    hint = f"use --prune-percent {fix} or more" if fix is not None else "a class has too few images at any percent"
    raise LD3MError(f"--prune-percent {percent} keeps {kept[k]} of the {sizes[k]} images of class "
                    f"{data.class_names[k]!r} (int({percent} * {sizes[k]} / 100) = {kept[k]}; {len(short)} classes "
                    f"short), but {need} needs {min_per_class}; {hint}")


def prune_for_run(data, config):
    """The real data a distillation run keeps: `data` pruned by the config's prune_* fields.

    Fills `config.prune_scorer_hash` (recorded in config.json) with the scorer's hash; a value
    already there (a resumed run, or one given) must match, or the run is refused: a resume
    with another pruning is refused (the other prune_* fields are not resumable either)."""
    from . import distributed
    from .distill.setup import resolve_device

    settings = PruneSettings.from_config(config)
    comm = distributed.current()
    device = comm.device(resolve_device(config.device))
    # Under torchrun rank 0 scores (or trains the scorer) and the others take its losses: every
    # rank prunes alike, and the scorer is trained once. Unpruned runs skip the collective.
    score_on_main = lambda: pruning_losses(data, settings, subset=config.subset,  # noqa: E731
                                           cache_dir=config.cache_dir, device=device)
    losses, record = comm.on_main(score_on_main) if settings.percent != 100 else pruning_losses(data, settings)
    pruned, record = apply_pruning(data, losses, settings, record, min_per_class=config.ipc,
                                   need=f"--ipc {config.ipc} (the synthetic set starts from IPC real images per class)")
    found = record.get("scorer_hash")
    recorded = config.prune_scorer_hash
    if recorded is not None and found != recorded:
        raise LD3MError(f"the pruning scorer's hash is {found} but the run records {recorded}: the scorer or its "
                        "losses changed; a run cannot continue with another pruning (start a new one)")
    config.prune_scorer_hash = found
    return pruned


__all__ = ["LOSSES_FORMAT", "PRUNE_ORDERS", "PruneSettings", "ResNet18FileScorer", "Scorer", "TrainedScorer",
           "TrainedScorerSettings", "apply_pruning", "build_scorer", "pruning_losses", "check_prune_settings", "kept_count", "losses_cache_dir",
           "losses_for", "prune_dataset", "prune_for_run", "prune_indices", "read_losses", "score",
           "smallest_percent", "write_losses"]
