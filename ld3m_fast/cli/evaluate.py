"""`ld3m-fast eval SET [SET ...]`: train fresh networks on synthetic sets, test on real data.

A SET is an ld3m-fast run folder, a folder of images per class (ImageFolder layout) or a
safetensors file with `images` and `labels` (see docs/evaluation.md). Every set is
trained under one protocol (`--protocol paper|quick`, flags override it) together with a
random real subset of the same size per class, and, with `--full-real train`, the whole
real train split. Before training it prints the plan and an estimate of its time on
this machine (measured: a few training steps of every architecture); then progress and
every accuracy as it comes. Results: eval.json and eval.md (eval.png when several sets
are compared) in `--out` (default: the run folder, when one run is evaluated), rewritten
after every finished job.

DD-Ranking-compatible options (docs/evaluation.md): `--labels soft --teacher PATH|train`
(soft-label IOR and HLR beside the hard ones), `--report best` (best of checkpoints, labelled
so), `--baseline-lr search`, `--augment cutmix`, all at once with `--protocol ddranking`;
`--baselines random,herding,kcenter` adds coresets beside the random real subset;
`--max-test-per-class N` is a quick check on part of the test split (said in the report).

Under torchrun (`torchrun --nproc-per-node N -m ld3m_fast eval ...`) the jobs are spread over
the ranks (longest estimated first, to the least loaded rank); every job's result depends
only on (set, architecture, seed), so rank 0 gathers them and writes the same report.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .._files import check_writable_folder, quoted_path, reported_write
from ..bounds import COUNT, POSITIVE, SEED
from ..errors import LD3MError
from .distill import add_threads_argument, apply_threads

logger = logging.getLogger(__name__)

# A non-interactive run prints a progress line at most this often.
PROGRESS_LINE_SECONDS = 30.0


def baseline_list(text: str) -> tuple[str, ...]:
    """--baselines: a comma-separated subset of random, herding, kcenter (argparse type)."""
    from ..distill.evaluation import BASELINE_KINDS

    names = tuple(dict.fromkeys(n.strip().lower().replace("-", "") for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BASELINE_KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(BASELINE_KINDS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..distill.evaluation import AUGMENTS, BASELINE_LRS, LABEL_MODES, PROTOCOLS, REPORTS
    from ..distill.real_networks import REAL_NETWORK_EPOCHS

    parser.add_argument("sets", nargs="+", metavar="SET",
                        help="run folders, image folders (one subfolder per class) or .safetensors files")
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="paper",
                        help="paper: SPEC §2.5, 5 archs x 5 seeds x 1000 epochs, full test split; quick: "
                             "convnet+vgg11 x 2 seeds x 50 epochs, 100 test images per class; ddranking: paper "
                             "with DD-Ranking's --report best --baseline-lr search --augment cutmix "
                             "(default: paper)")
    parser.add_argument("--labels", choices=LABEL_MODES, default=None,
                        help="soft: also train every set on a teacher's logits (DD-Ranking's soft-label protocol, "
                             "KL at --temperature); soft-label IOR and HLR are reported beside the hard ones "
                             "(default: hard)")
    parser.add_argument("--teacher", default=None, metavar="PATH|train",
                        help="the soft-label teacher: an ld3m-fast network file, a torchvision ResNet-18 state "
                             "dict, or 'train' (a ConvNet trained on the real train split, cached; default)")
    parser.add_argument("--teacher-epochs", type=COUNT, default=REAL_NETWORK_EPOCHS,
                        help="epochs of a network trained on the real data (the 'train' teacher and the "
                             f"coresets' feature network; default {REAL_NETWORK_EPOCHS})")
    parser.add_argument("--temperature", type=POSITIVE, default=None,
                        help="soft-label KL temperature (default 1.0, DD-Ranking's configurations)")
    parser.add_argument("--report", choices=REPORTS, default=None,
                        help="final: the accuracy after the last epoch (ours, default); best: the best test "
                             "accuracy over checkpoints every 10 epochs (DD-Ranking's; selection on the test set)")
    parser.add_argument("--baseline-lr", choices=BASELINE_LRS, default=None,
                        help="search: train every baseline at each lr of DD-Ranking's grid "
                             "(0.001, 0.005, 0.01, 0.05, 0.1) and keep the best on the test set (default: fixed)")
    parser.add_argument("--augment", choices=AUGMENTS, default=None,
                        help="training augmentation (default dsa; ddranking: cutmix)")
    parser.add_argument("--baselines", type=baseline_list, default=None, metavar="random,herding,kcenter",
                        help="baselines of the same IPC per class: random real subsets, herding and k-center "
                             "coresets in a real-trained ConvNet's feature space (default: random)")
    parser.add_argument("--archs", default=None, help="comma-separated pool (overrides the protocol's)")
    parser.add_argument("--epochs", type=COUNT, default=None, help="training epochs (overrides the protocol's)")
    parser.add_argument("--seeds", type=COUNT, default=None, help="seeds per architecture (overrides the protocol's)")
    parser.add_argument("--lr", type=POSITIVE, default=None,
                        help="learning rate (overrides the protocol's; VGG-11 keeps 1/10 of it)")
    parser.add_argument("--batch", type=COUNT, default=None, help="training batch size (default 256)")
    parser.add_argument("--max-test-per-class", "--test-per-class", "--max-per-class", dest="test_per_class",
                        type=COUNT, default=None,
                        help="test on at most N images per class: a quick check, labelled as such in the report "
                             "(paper: the whole test split, quick: 100)")
    parser.add_argument("--no-dsa", action="store_true", help="train without augmentation (= --augment none)")
    parser.add_argument("--data", default=None,
                        help="real data for the test split and the baselines (default: the runs' --data; "
                             "needed for sets that are not ld3m-fast runs)")
    parser.add_argument("--subset", default=None, help="ImageNet subset of --data (default: the runs')")
    parser.add_argument("--res", type=COUNT, default=None,
                        help="resolution of the test split; every set must have it (default: the runs', "
                             "else the first set's)")
    parser.add_argument("--cache-dir", default=None, help="decoded-data cache folder (default: the runs')")
    parser.add_argument("--full-real", default=None, metavar="ACC|ARCH=ACC,...|train",
                        help="full-real accuracy for HLR: one fraction for every architecture (0.91), per "
                             "architecture (convnet=0.91,vgg11=0.88), or 'train' to train on the whole "
                             "train split under the same protocol (expensive: see the estimate)")
    parser.add_argument("--no-random-real", action="store_true",
                        help="skip the random-real baseline (no IOR; halves the cost for one set)")
    parser.add_argument("--out", default=None,
                        help="folder for eval.json / eval.md / eval.png (default: the run folder when "
                             "exactly one run is evaluated)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the plan and the time estimate, then stop")
    parser.add_argument("--no-progress", action="store_true",
                        help="progress lines every 30 s instead of a progress bar")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="base seed of every job's stream and of the random-real draw (default 0)")
    add_threads_argument(parser)


def parse_full_real(text: str | None, archs: tuple[str, ...]):
    """--full-real -> None, "train", or {arch: fraction}."""
    from ..networks import parse_arch

    if text is None:
        return None
    if text.strip().lower() == "train":
        return "train"

    def fraction(value: str, what: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise LD3MError(f"--full-real: {what} {value!r} is not a number") from None
        if not 0.0 <= number <= 1.0:
            raise LD3MError(f"--full-real: {what} {value} is not a fraction in [0, 1] (write 0.91, not 91)")
        return number

    if "=" not in text:
        value = fraction(text.strip(), "accuracy")
        return {arch: value for arch in archs}
    values = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise LD3MError(f"--full-real: expected ARCH=ACC items, got {item!r}")
        arch, value = item.split("=", 1)
        values[parse_arch(arch.strip())[0]] = fraction(value.strip(), f"accuracy of {arch.strip()}")
    return values


def _unique_names(paths: list[str]) -> list[str]:
    names = []
    for path in paths:
        base = Path(path).name.removesuffix(".safetensors") or str(path)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _data_settings(args, run_configs: list[dict]):
    """(data, subset, cache_dir) for the test split and the baselines."""
    if args.data is not None:
        return args.data, args.subset, args.cache_dir
    if not run_configs:
        raise LD3MError("none of the sets is an ld3m-fast run: pass --data (and --subset for an ImageNet "
                        "tree) to name the real data they were made from")
    sources = {(c["data"], c.get("subset")) for c in run_configs}
    if len(sources) > 1:
        raise LD3MError("the runs were made from different data (" + "; ".join(
            f"{d}{f' --subset {s}' if s else ''}" for d, s in sorted(sources, key=str)) +
            "): evaluate them separately or pass --data")
    data, subset = sources.pop()
    return data, args.subset or subset, args.cache_dir or run_configs[0].get("cache_dir")


class Progress:
    """A tqdm bar in units of estimated seconds (so its remaining time follows the estimate,
    corrected by the measured rate), or a line every `PROGRESS_LINE_SECONDS` without a TTY
    or with --no-progress; and one line per finished job."""

    def __init__(self, estimates: dict, *, bar: bool, epochs: int = 0):
        self.estimates = estimates
        self.epochs = epochs
        self.total = sum(estimates.values())
        self.done = 0.0
        self.job_spent = 0.0
        self.started = time.perf_counter()
        self.last_line = self.started
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="est-s", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def start(self, job, epochs: int):
        """The `on_epoch` callback for `job`'s training."""
        share = self.estimates[job] * 0.95 / epochs  # the test pass takes the rest
        description = job.describe()
        self.job_spent = 0.0
        if self.bar is not None:
            self.bar.set_description(description, refresh=False)

        def callback(epoch: int) -> None:
            self.job_spent += share
            self.advance(share)
            now = time.perf_counter()
            if self.bar is None and now - self.last_line >= PROGRESS_LINE_SECONDS:
                self.last_line = now
                logger.info(f"  [{100 * self.done / max(self.total, 1e-9):3.0f}%] {description}: epoch "
                            f"{epoch}/{epochs}, {self.eta()}")

        return callback

    def advance(self, amount: float) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)

    def eta(self) -> str:
        from ..distill.evaluation import format_duration

        elapsed = time.perf_counter() - self.started
        if self.done <= 0:
            return f"{format_duration(elapsed)} elapsed"
        left = (self.total - self.done) * elapsed / self.done
        return f"{format_duration(elapsed)} elapsed, about {format_duration(left)} left"

    def finished(self, job, result: dict) -> None:
        self.advance(self.estimates[job] - self.job_spent)
        best = (f", best {100 * result['best_accuracy']:.2f}% at epoch {result['best_epoch']}"
                if result.get("best_epoch") not in (None, self.epochs) else "")
        line = f"{job.describe()}: {100 * result['final_accuracy']:.2f}% final{best} ({result['seconds']:.0f} s)"
        if self.bar is not None:
            with self.bar.external_write_mode(file=sys.stdout):  # the line above the bar, not through it
                logger.info(line)
        else:
            logger.info(line)

    def close(self) -> None:
        if self.bar is not None:
            if self.done >= self.total * (1 - 1e-9):  # float shares: end exactly at 100%
                self.bar.n = self.bar.total
                self.bar.refresh()
            self.bar.close()


def _protocol(args, first_run: dict):
    """The EvalConfig: the named protocol, the flags given over it, the runs' ConvNet."""
    from ..distill import evaluation as ev
    from ..networks import parse_arch

    if args.no_dsa and args.augment not in (None, "none"):
        raise LD3MError(f"--no-dsa and --augment {args.augment} contradict each other: give one")
    baselines = args.baselines
    if args.no_random_real:
        if baselines is not None and "random" in baselines:
            raise LD3MError("--no-random-real and --baselines random contradict each other: give one")
        baselines = tuple(b for b in (baselines or ()) if b != "random")
    overrides = {"epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch, "lr": args.lr,
                 "test_per_class": args.test_per_class, "labels": args.labels, "temperature": args.temperature,
                 "report": args.report, "baseline_lr": args.baseline_lr,
                 "augment": "none" if args.no_dsa else args.augment, "baselines": baselines}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.archs is not None:
        archs = tuple(dict.fromkeys(parse_arch(a.strip())[0] for a in args.archs.split(",") if a.strip()))
        if not archs:
            raise LD3MError("--archs must name at least one architecture")
        overrides["archs"] = archs
    base = ev.PROTOCOLS[args.protocol]
    if args.lr is not None:  # the per-architecture rates keep their ratio to the base rate
        overrides["arch_lr"] = {a: args.lr * v / base.lr for a, v in base.arch_lr.items()}
    if args.teacher is not None and overrides.get("labels", base.labels) != "soft":
        raise LD3MError("--teacher labels the sets with --labels soft; add --labels soft or drop --teacher")
    config = ev.protocol_config(args.protocol, **overrides)
    # The ConvNet of the runs (as distilled), as before; recorded in eval.json's protocol.
    for key in ("width", "depth", "norm"):
        if first_run.get(key) is not None:
            setattr(config, key, first_run[key])
    return config


def check_teacher_path(text: str | None) -> None:
    if text is not None and text != "train" and not Path(text).is_file():
        raise LD3MError(f"--teacher {text} does not exist: give a network file or 'train'")


def _real_network_spec(args, config, res: int, num_classes: int):
    """The ConvNet trained on the real data for the 'train' teacher and the coresets' features."""
    from ..distill.real_networks import RealNetworkSpec

    return RealNetworkSpec(res=res, num_classes=num_classes, arch="convnet", width=config.width,
                           depth=config.depth, norm=config.norm, epochs=args.teacher_epochs, seed=args.seed)


def _real_network(args, config, train, res, comm, device, cache_dir):
    """The real-trained ConvNet and what the report says of it: from the cache, or (after a line
    with its estimated training time) trained by rank 0 and cached, the other ranks reading the
    cache. With --estimate-only an uncached one is not trained: its untrained initialisation
    stands in (for the calibration and the coresets' sizes)."""
    from ..distill.real_networks import (cached_real_network, imageset_fingerprint, load_network_file,
                                         train_real_network, untrained_network)

    spec = _real_network_spec(args, config, res, train.num_classes)
    data_key = imageset_fingerprint(train)
    cached = cached_real_network(spec, data_key, cache_dir)
    if cached is not None:
        logger.info(f"real-data network: {cached[1]['description']}, cached at {cached[1]['path']}")
        return cached[0].to(device), cached[1]
    if comm.is_main:
        _say_training_estimate(spec, train, device)
    if args.estimate_only:
        return untrained_network(spec).to(device).eval(), {"description": spec.describe(), "cached": False,
                                                           "trained": False}
    trained = {}

    def train_on_main() -> dict:
        trained["network"], info = train_real_network(train.images, train.labels, spec, data_key=data_key,
                                                      cache_dir=cache_dir, device=device)
        return info

    info = comm.on_main(train_on_main)
    network = trained["network"] if "network" in trained else load_network_file(info["path"])[0]
    return network.to(device).eval(), info


def _say_training_estimate(spec, train, device) -> None:
    import math

    from ..distill import evaluation as ev
    from ..distill.algorithms import stream_generator
    from ..distill.real_networks import recipe, untrained_network

    count = len(train)
    batch = min(count, spec.batch_size)
    step = ev.training_step_seconds(untrained_network(spec), batch, spec.res, config=recipe(spec),
                                    num_classes=train.num_classes, generator=stream_generator(0, "eval-calibration"),
                                    device=device)
    seconds = spec.epochs * math.ceil(count / batch) * step
    logger.info(f"real-data network: {spec.describe()} is not cached: training it on {count} images takes about "
                f"{ev.format_duration(seconds)} here (once; later evaluations of this data share it)")


def _print_plan(all_sets, config, jobs, test, res, num_classes) -> None:
    modes = " x hard+soft labels" if config.labels == "soft" else ""
    logger.info(f"eval: protocol {config.name}: {len(all_sets)} sets x {len(config.archs)} archs "
                f"({', '.join(config.archs)}) x {config.seeds} seeds x {config.epochs} epochs{modes} = {len(jobs)} "
                f"trainings; test: {len(test)} images ({test.description}) at {res}²")
    logger.info(f"  accuracy: {_accuracy_note(config)}")
    if config.test_per_class is not None:
        logger.info(f"  test: at most {config.test_per_class} images per class: a quick check, not the full test "
                    "split")
    for s in all_sets:
        info = s.info(num_classes)
        ipc = f" (IPC {info['ipc']})" if info["ipc"] is not None and s.kind != "full-real" else ""
        searched = f", lr searched over {len(config.lr_grid)} rates" if config.searches_lr(s.kind) else ""
        logger.info(f"  {s.name}: {s.kind}, {info['images']} images{ipc}{searched}, {s.source}")
        if s.kind == "full-real":
            logger.info(f"  (full-real trains on all {info['images']} train images every epoch: expensive, see "
                        "its estimate)")


def _accuracy_note(config) -> str:
    from ..distill.evaluation import accuracy_label

    return accuracy_label(config.to_dict())


def _estimate(all_sets, config, jobs, test, res, num_classes, device, teacher=None) -> dict:
    """Calibrate, print the estimate (and the quick protocol's when the paper's is long)."""
    import torch

    from .._host import cpu_model
    from ..distill import evaluation as ev

    threads = torch.get_num_threads()
    sizes = {s.name: int(s.labels.numel()) for s in all_sets}
    logger.info(f"calibrating: a few training steps of every architecture on {device} ({threads} threads)...")
    calibration = ev.calibrate(set(sizes.values()), config=config, res=res, num_classes=num_classes,
                               device=device, teacher=teacher)
    estimates = ev.estimate_seconds(jobs, sizes, len(test), calibration, config)
    per_set: dict[str, float] = {}
    for job, seconds in estimates.items():
        per_set[job.set] = per_set.get(job.set, 0.0) + seconds
    where = cpu_model() if device.type == "cpu" else str(device)
    logger.info(f"estimate: about {ev.format_duration(sum(estimates.values()))} on this machine now ({where}, "
                f"{threads} threads; from steps timed in {calibration.seconds:.0f} s, an estimate only: other load "
                "changes it): " + ", ".join(f"{n} {ev.format_duration(v)}" for n, v in per_set.items()))
    quick = ev.PROTOCOLS["quick"]
    if config.name.startswith("paper") and sum(estimates.values()) > 3600 and \
            all(a in config.archs for a in quick.archs) and config.batch_size == quick.batch_size:
        quick_jobs = ev.plan_jobs([s.name for s in all_sets if s.kind != "full-real"], quick)
        quick_test = min(len(test), quick.test_per_class * num_classes)
        quick_total = sum(ev.estimate_seconds(quick_jobs, sizes, quick_test, calibration, quick).values())
        logger.info(f"  (long: --protocol quick would take about {ev.format_duration(quick_total)})")
    return {"estimates": estimates, "calibration_seconds": calibration.seconds, "threads": threads,
            "cpu": cpu_model()}


def _load_sets(args):
    from ..distill import evaluation as ev

    sets, run_configs = [], []
    for path, name in zip(args.sets, _unique_names(args.sets)):
        eval_set, run_config = ev.load_eval_set(path, name=name)
        sets.append(eval_set)
        if run_config is not None:
            run_configs.append(run_config)
    return sets, run_configs


def _output_folder(args, sets) -> Path:
    out = Path(args.out) if args.out else None
    if out is None:
        if len(sets) == 1 and sets[0].kind == "distilled":
            out = Path(sets[0].source)
        else:
            raise LD3MError("pass --out FOLDER to say where eval.json goes (it defaults to the run folder "
                            "only when exactly one run is evaluated)")
    return check_writable_folder(out, "--out")


def _with_baselines(args, config, sets, train, full_real, res, num_classes, comm, device, *, subset, cache_dir):
    """The sets, their baselines (random real, coresets) and the full real split; the teacher
    (None without soft labels) and what the report says about the real-trained networks."""
    from ..distill import evaluation as ev
    from ..distill.real_networks import load_classifier

    all_sets = list(sets)
    if "random" in config.baselines:
        all_sets = ev.with_random_real_baselines(sets, train, num_classes=num_classes, seed=args.seed)
    notes: dict = {}
    network = None
    coresets = [k for k in config.baselines if k != "random"]
    if coresets or (config.labels == "soft" and (args.teacher or "train") == "train"):
        network, notes["real_network"] = _real_network(args, config, train, res, comm, device, cache_dir)
    if coresets:
        all_sets += ev.with_coreset_baselines(sets, train, network, kinds=coresets, num_classes=num_classes,
                                              device=device, seed=args.seed)
        notes["coreset_features"] = notes["real_network"]["description"]
    if full_real == "train":
        all_sets.append(ev.EvalSet("full-real", train.images, train.labels, "full-real",
                                   source=f"the whole train split of {train.description}"))
    teacher = None
    if config.labels == "soft":
        if (args.teacher or "train") == "train":
            teacher, notes["teacher"] = network, dict(notes["real_network"])
        else:
            teacher, notes["teacher"] = load_classifier(args.teacher, num_classes=num_classes, res=res,
                                                        subset=subset)
            teacher = teacher.to(device)
    return all_sets, teacher, notes


@contextmanager
def _stopped_by_another_rank(comm, results: list[dict], planned: int):
    """Another rank that dies (a failed collective) or goes silent (the heartbeat) stops this one
    with a line that says which of its jobs finished; no eval.json is written then (under
    torchrun it is written once, whole, after every rank's jobs)."""
    from .. import distributed

    def stopped_by(what: str) -> str:
        done = ", ".join(f"{r['set']}/{r['arch']}/seed {r['seed']} ({100 * r['accuracy']:.2f}%)" for r in results)
        return (f"{what}; stopped. No eval.json was written; this rank finished {len(results)} of its {planned} "
                f"jobs" + (f": {done}" if done else ""))

    try:
        with comm.on_unheard(stopped_by):
            yield
    except distributed.RankFailure as error:
        raise distributed.RankFailure(stopped_by(str(error))) from None


def run(args) -> int:
    import torch

    from .. import distributed
    from ..data import load_dataset
    from ..distill import evaluation as ev
    from ..distill import resolve_device

    comm = distributed.from_environment(args.device)
    main = comm.is_main
    apply_threads(args)
    device = comm.device(resolve_device(args.device))
    check_teacher_path(args.teacher)
    sets, run_configs = _load_sets(args)
    out = _output_folder(args, sets)
    config = _protocol(args, run_configs[0] if run_configs else {})
    full_real = parse_full_real(args.full_real, config.archs)

    # The test split (and the train split for the baselines) at the sets' resolution.
    res = args.res if args.res is not None else next((s.res for s in sets if s.kind == "distilled"), sets[0].res)
    data, subset, cache_dir = _data_settings(args, run_configs)
    test = load_dataset(data, split="test", subset=subset, res=res, cache_dir=cache_dir,
                        max_per_class=config.test_per_class)
    num_classes = test.num_classes
    for s in sets:
        ev.check_eval_set(s.images, s.labels, num_classes=num_classes, res=res, what=f"set {s.name}")
    all_sets, teacher, notes = list(sets), None, {}
    if config.baselines or full_real == "train" or config.labels == "soft":
        train = load_dataset(data, split="train", subset=subset, res=res, cache_dir=cache_dir)
        if train.num_classes != num_classes:
            raise LD3MError(f"{data}: the train split has {train.num_classes} classes, the test split {num_classes}")
        all_sets, teacher, notes = _with_baselines(args, config, sets, train, full_real, res, num_classes,
                                                   comm, device, subset=subset, cache_dir=cache_dir)

    kinds = {s.name: s.kind for s in all_sets}
    jobs = ev.plan_jobs([s.name for s in all_sets], config, kinds)
    estimate = None
    if main:  # the other ranks wait for rank 0's plan at the broadcast below
        _print_plan(all_sets, config, jobs, test, res, num_classes)
        estimate = _estimate(all_sets, config, jobs, test, res, num_classes, device, teacher)
        if comm.world_size > 1:
            logger.info(f"distributed: {comm.describe()}; the jobs are spread over the ranks")
    if args.estimate_only:
        return 0
    if comm.world_size > 1:
        estimate = comm.broadcast_object(estimate)
    mine = ev.assign_jobs(jobs, estimate["estimates"], comm.world_size)[comm.rank]

    by_name = {s.name: s for s in all_sets}
    infos = {s.name: s.info(num_classes) for s in all_sets}
    given_full = {"source": "given", "per_arch": full_real} if isinstance(full_real, dict) else None
    total = sum(estimate["estimates"].values())
    timing = {"estimate_seconds": total, "calibration_seconds": estimate["calibration_seconds"],
              "threads": estimate["threads"], "device": str(device), "cpu": estimate["cpu"],
              "torch": torch.__version__}
    test_meta = {"source": test.description or str(data), "images": len(test), "res": res,
                 "per_class": config.test_per_class, "num_classes": num_classes,
                 "quick_check": config.test_per_class is not None}
    results: list[dict] = []
    started = time.perf_counter()

    def report() -> dict:
        out_report = ev.gather(results, config=config, sets=infos, full_real=given_full)
        out_report.update(test=test_meta, seed=args.seed, jobs=list(results), **notes,
                          timing={**timing, "elapsed_seconds": time.perf_counter() - started})
        if len(sets) == 1:  # the single set's result where `evaluate_synthetic` put it
            row = out_report["sets"][sets[0].name]
            out_report.update(per_arch=row["per_arch"], unseen_mean=row["unseen_mean"],
                              distill_arch=ev.DISTILL_ARCH, epochs=config.epochs, seeds=config.seeds)
        return out_report

    shown = {jobs[i]: estimate["estimates"][jobs[i]] for i in mine}
    progress = Progress(shown, bar=main and not args.no_progress and sys.stderr.isatty(), epochs=config.epochs)
    with _stopped_by_another_rank(comm, results, len(mine)):
        try:
            for i in mine:
                job = jobs[i]
                result = ev.run_job(job, by_name[job.set], test.images, test.labels, num_classes=num_classes,
                                    config=config, seed=args.seed, device=device, teacher=teacher,
                                    on_epoch=progress.start(job, config.epochs) if main else None)
                results.append(result)
                if main:
                    progress.finished(job, result)
                    if comm.world_size == 1:  # a cut-off run keeps what it finished
                        with reported_write(f"the report in --out {quoted_path(out)}"):
                            ev.write_report(report(), out, plot=False)
        finally:
            progress.close()
        if comm.world_size > 1:  # eval.json is written once, whole, from every rank's results
            gathered = comm.gather_to_main(results)
    if comm.world_size > 1:
        if not main:
            return 0
        order = {j.key: i for i, j in enumerate(jobs)}
        results[:] = sorted((r for part in gathered for r in part),
                            key=lambda r: order[(r["set"], r["arch"], r["seed"], r["labels"], r["lr"])])
    final = report()
    with reported_write(f"the report in --out {quoted_path(out)}", "every job finished; free space and evaluate again"):
        written = ev.write_report(final, out, plot=len(sets) > 1)
    print(ev.format_markdown(final))
    logger.info(f"wrote {', '.join(str(p) for p in written)} ({ev.format_duration(time.perf_counter() - started)}; "
                f"estimated {ev.format_duration(total)})")
    return 0
