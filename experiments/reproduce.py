"""Small-scale reproduction of LD3M on real data (issue 6, item 4), CPU-sized.

Parts (one subcommand each; every result is written to docs/reproduction/ as it
comes, so a cut-off run leaves what it finished behind):

    gradnorm              (a) ||dL/dZ|| vs T in {10..90} for skip None / "x0" / "mean"
    buffer                MTT expert buffer (for part b)
    distill METHOD IPC    (b, c) one synthetic set: real | pixel-dm | dm | dc | mtt  [--steps T]
    evaluate METHOD IPC   (b, c) train fresh networks on a set, test on the real test split
    queue-main / queue-side   the two job queues used for the committed results
    queue-finish          a worker over every evaluation (re-run with the corrected EMA), the
                          unseen archs also at IPC 1 and up to 5 seeds; run two side by side
    report                tables (markdown) and PNG plots from the JSON results

The protocol (every number below) is fixed in docs/reproduction.md before any
result was looked at. Everything is deterministic given `SEED` (explicit
torch.Generators from `stream_generator`); timings are wall-clock on whatever
machine runs it (set OMP_NUM_THREADS=1; this script also calls
torch.set_num_threads(1)).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

torch.set_num_threads(1)

from ld3m_fast.data import load_dataset
from ld3m_fast.distill import (
    DM,
    DistillConfig,
    EvalConfig,
    NetworkSpec,
    RealData,
    StepContext,
    build_buffer,
    load_final,
    start_run,
)
from ld3m_fast.distill.algorithms import stream_generator
from ld3m_fast.distill.evaluation import EvalJob, EvalSet, mean_std as library_mean_std, random_real_indices, run_job
from ld3m_fast._files import atomic_write, write_json_atomic, write_text_atomic
from ld3m_fast.normalization import from_uint8
from ld3m_fast.priors.default import default_prior_path, load_default_prior

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "reproduction"
WORK = Path(os.environ.get("LD3M_REPRO_WORK", "/tmp/ld3m_repro"))

# ----------------------------------------------------------------------------- protocol
SEED = 0
RES = 32
NUM_CLASSES = 10
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"

GRADNORM_STEPS = (10, 20, 30, 40, 50, 60, 70, 80, 90)
GRADNORM_SKIPS = (None, "x0", "mean")
GRADNORM_BATCH_REAL = 64          # fixed real images per class in the fixed DM loss

DISTILL_ITERATIONS = 50
DISTILL_STEPS = 10                # T for part (b)
GUIDANCE = 3.0
BATCH_REAL = 32                   # real images per class per iteration (DM, DC)
PIXEL_LR = 1.0                    # pixel-space DM: SGD on pixels, lr 1, momentum 0.5 (DM's released)
PIXEL_MOMENTUM = 0.5
MTT_OPTIONS = {"syn_steps": 5, "expert_epochs": 2, "max_start_epoch": 2, "student_lr": 0.01}
MTT_BATCH_SYN = {1: None, 10: 50}
BUFFER = {"num_experts": 3, "epochs": 3, "per_class": 500, "lr": 0.01, "batch_size": 256}

EVAL_EPOCHS = 50
EVAL_LR = 0.01
EVAL_ARCH_LR = {"vgg11": 1e-3}   # VGG-11 keeps the library's 10x lower rate
CONVNET_SEEDS = 5
UNSEEN_ARCHS = ("alexnet", "vgg11", "resnet18")
UNSEEN_SEEDS = 1

STEPS_SWEEP = (2, 5, 10, 20)      # part (c), LD3M-DM at IPC 10
STEPS_SWEEP_SEEDS = 2
METHODS = ("real", "pixel-dm", "dm", "dc", "mtt")

# Added after the first results (session 2), nothing above changed. The first evaluations
# (docs/reproduction/evals-v1) tested a weight EMA that still held 78% of the untrained network
# after 50 steps; the library now bias-corrects it and every evaluation was run again (evals/).
# The unseen architectures are also evaluated at IPC 1 and get up to the 5 seeds
# (same sets, same settings), as far as the session's time allowed.
UNSEEN_SEEDS_EXTENDED = 5


# ----------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


def try_lock(lock: Path) -> bool:
    """Create the lock file; False if another queue already holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@contextmanager
def exclusive(name: str, done):
    """Run the body in at most one of the queues: the first to create WORK/locks/<name> does the
    work; the other waits until `done()` is true (the two queues share sets and the buffer)."""
    lock = WORK / "locks" / name
    if not try_lock(lock):
        while not done():
            time.sleep(5)
        yield False
        return
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


_DATA = {}


def dataset(split: str, max_per_class: int | None = None):
    key = (split, max_per_class)
    if key not in _DATA:
        _DATA[key] = load_dataset("fashion-mnist", split=split, res=RES, max_per_class=max_per_class)
    return _DATA[key]


def initial_real_selection(labels: torch.Tensor, ipc: int, seed: int = SEED) -> torch.Tensor:
    """The indices `SyntheticSet.from_real` picks with the loop's "init" stream (same draws),
    so the random-real baseline and pixel DM start from the images LD3M encodes."""
    return random_real_indices(labels, [ipc] * NUM_CLASSES, stream_generator(seed, "init"))


def set_name(method: str, ipc: int, steps: int = DISTILL_STEPS) -> str:
    return f"{method}_ipc{ipc}" + ("" if method in ("real", "pixel-dm") else f"_T{steps}")


def set_path(method: str, ipc: int, steps: int = DISTILL_STEPS) -> Path:
    return WORK / "sets" / f"{set_name(method, ipc, steps)}.pt"


# ----------------------------------------------------------------------------- (a)
def gradnorm() -> dict:
    """||dL/dZ|| for every (skip, T) with fixed Z, c, noise and a fixed loss.

    Z, c: encodings of 1 fixed real image per class (the loop's init draw, seed 0).
    Loss: the DM loss (no augmentation) of the 10 rendered images against a fixed
    real batch (64 per class) under one fixed random ConvNet: the DM object is
    called with a freshly seeded context every time, so network and batch are the
    same for every (skip, T).
    """
    from ld3m_fast.generator import LD3MGenerator
    from ld3m_fast.synthetic import SyntheticSet

    prior = load_default_prior()
    train = dataset("train")
    synthetic = SyntheticSet.from_real(prior, train.images, train.labels, 1, stream_generator(SEED, "init"))
    real = RealData(train.images, train.labels, NUM_CLASSES)
    algorithm = DM(NetworkSpec(num_classes=NUM_CLASSES, res=RES), batch_real=GRADNORM_BATCH_REAL)
    out_path = RESULTS / "gradnorm.json"
    result = {"protocol": {"ipc": 1, "guidance": GUIDANCE, "grad_mode": "recompute", "eta": 0.0,
                           "loss": "DM loss, no DSA, fixed ConvNet (seed stream 'gradnorm-loss'), "
                                   f"fixed real batch {GRADNORM_BATCH_REAL}/class",
                           "Z": "encodings of 1 real image per class (stream 'init', seed 0)",
                           "noise": "one fixed start noise (stream 'gradnorm-noise')"},
              "rows": []}
    for skip in GRADNORM_SKIPS:
        for steps in GRADNORM_STEPS:
            generator = LD3MGenerator(prior, steps, guidance=GUIDANCE, skip=skip, grad_mode="recompute")
            noise = generator.draw_noise(len(synthetic), stream_generator(SEED, "gradnorm-noise"))
            Z = synthetic.Z.detach().clone().requires_grad_(True)
            c = synthetic.c.detach().clone().requires_grad_(True)
            started = time.perf_counter()
            images = generator(Z, c, noise)
            context = StepContext(real=real, generator=stream_generator(SEED, "gradnorm-loss"))
            loss, image_grad = algorithm.image_gradient(images.detach(), synthetic.labels, context)
            images.backward(image_grad)
            row = {"skip": "none" if skip is None else skip, "T": steps, "loss": float(loss),
                   "grad_norm_Z": float(Z.grad.norm()), "grad_norm_c": float(c.grad.norm()),
                   "grad_norm_images": float(image_grad.norm()), "seconds": time.perf_counter() - started}
            result["rows"].append(row)
            write_json_atomic(out_path, result)
            log(f"gradnorm {row}")
    return result


# ----------------------------------------------------------------------------- (b, c): sets
def build_mtt_buffer() -> Path:
    out = WORK / "buffer"
    finished = lambda: (RESULTS / "distill" / "buffer.json").is_file()
    if finished():
        return out
    with exclusive("buffer", finished) as mine:
        if mine:
            _build_buffer(out)
    return out


def _build_buffer(out: Path) -> None:
    data = dataset("train", BUFFER["per_class"])
    started = time.perf_counter()
    build_buffer(out, NetworkSpec(num_classes=NUM_CLASSES, res=RES, norm="instance"), data.images, data.labels,
                 num_experts=BUFFER["num_experts"], epochs=BUFFER["epochs"], keep_epochs=None,
                 lr=BUFFER["lr"], batch_size=BUFFER["batch_size"], dsa_strategy=DSA_STRATEGY, seed=SEED,
                 source="fashion-mnist", progress=lambda i, n, p: log(f"expert {i}/{n} -> {p}"))
    write_json_atomic(RESULTS / "distill" / "buffer.json",
               {**BUFFER, "train_images": int(data.labels.numel()), "seconds": time.perf_counter() - started})


def distill(method: str, ipc: int, steps: int = DISTILL_STEPS) -> Path:
    """Make one synthetic set and save (images, labels) to WORK/sets; timing to docs/reproduction/distill."""
    path = set_path(method, ipc, steps)
    if path.is_file():
        return path
    with exclusive(path.stem, path.is_file) as mine:
        if mine:
            _distill(method, ipc, steps, path)
    return path


def _distill(method: str, ipc: int, steps: int, path: Path) -> None:
    train = dataset("train")
    started = time.perf_counter()
    info = {"method": method, "ipc": ipc, "iterations": 0}
    if method == "real":
        index = initial_real_selection(train.labels, ipc)
        images, labels = from_uint8(train.images[index]), train.labels[index]
    elif method == "pixel-dm":
        images, labels, info = pixel_dm(train, ipc)
    else:
        images, labels, info = ld3m_distill(method, ipc, steps)
    info["wall_seconds"] = time.perf_counter() - started
    with atomic_write(path, suffix=".pt") as tmp:  # the file's existence marks the set done
        torch.save({"images": images.detach().cpu(), "labels": labels.cpu()}, tmp)
    write_json_atomic(RESULTS / "distill" / f"{set_name(method, ipc, steps)}.json", info)
    log(f"distilled {set_name(method, ipc, steps)}: {info}")


def pixel_dm(train, ipc: int):
    """DM directly on pixels: the library's DM object, the loop's streams, SGD on the images."""
    from ld3m_fast.dsa import DSA

    index = initial_real_selection(train.labels, ipc)
    labels = train.labels[index]
    images = torch.nn.Parameter(from_uint8(train.images[index]))
    optimizer = torch.optim.SGD([images], lr=PIXEL_LR, momentum=PIXEL_MOMENTUM)
    algorithm = DM(NetworkSpec(num_classes=NUM_CLASSES, res=RES, norm="instance"), batch_real=BATCH_REAL)
    context = StepContext(real=RealData(train.images, train.labels, NUM_CLASSES),
                          generator=stream_generator(SEED, "algorithm"), dsa=DSA(DSA_STRATEGY),
                          dsa_generator=stream_generator(SEED, "dsa"))
    seconds, losses = [], []
    for _ in range(DISTILL_ITERATIONS):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, grad = algorithm.image_gradient(images.detach(), labels, context)
        images.grad = grad
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss))
    info = {"method": "pixel-dm", "ipc": ipc, "iterations": DISTILL_ITERATIONS,
            "seconds_per_iteration_median": statistics.median(seconds), "first_loss": losses[0],
            "last_loss": losses[-1]}
    return images.detach(), labels, info


def ld3m_distill(method: str, ipc: int, steps: int):
    """LD3M through the library's own loop (`start_run`)."""
    import shutil

    from ld3m_fast.distill.export import save_image_grid

    run_dir = WORK / "runs" / set_name(method, ipc, steps)
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = {}
    if method == "mtt":
        extra = dict(buffer=str(build_mtt_buffer()), batch_syn=MTT_BATCH_SYN.get(ipc), **MTT_OPTIONS)
    config = DistillConfig(data="fashion-mnist", prior=str(default_prior_path()), algorithm=method, ipc=ipc,
                           steps=steps, guidance=GUIDANCE, skip="x0", grad_mode="recompute",
                           iterations=DISTILL_ITERATIONS, batch_real=BATCH_REAL, seed=SEED, out=str(run_dir),
                           dsa=DSA_STRATEGY, save_every=DISTILL_ITERATIONS, image_every=DISTILL_ITERATIONS,
                           progress=False, **extra)
    start_run(config)
    images, labels, _ = load_final(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "seconds" in r]
    seconds = [r["seconds"] for r in records]
    grid = RESULTS / "images" / f"{set_name(method, ipc, steps)}.png"
    save_image_grid(images, grid, ipc)
    info = {"method": method, "ipc": ipc, "T": steps, "iterations": len(records),
            "seconds_per_iteration_median": statistics.median(seconds),
            "seconds_per_iteration_mean": statistics.fmean(seconds),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "config": {k: v for k, v in config.to_dict().items() if k not in ("out", "prior", "buffer")}}
    return images, labels, info


# ----------------------------------------------------------------------------- (b, c): evaluation
def evaluate(method: str, ipc: int, arch: str, seeds: int, steps: int = DISTILL_STEPS) -> dict:
    """Evaluate one set on one architecture; writes docs/reproduction/evals/<set>_<arch>.json
    after every seed (seed s is the same network draw whatever `seeds` is)."""
    out = RESULTS / "evals" / f"{set_name(method, ipc, steps)}_{arch}.json"
    done = json.loads(out.read_text()) if out.is_file() else {"accuracies": [], "seconds": []}
    if len(done["accuracies"]) >= seeds:
        return done
    saved = torch.load(distill(method, ipc, steps))
    test = dataset("test")
    config = EvalConfig(archs=(arch,), seeds=seeds, epochs=EVAL_EPOCHS, lr=EVAL_LR,
                        arch_lr=dict(EVAL_ARCH_LR), norm="instance")
    result = {"method": method, "ipc": ipc, "T": steps, "arch": arch, "epochs": EVAL_EPOCHS,
              "lr": config.arch_lr.get(arch, config.lr), "test_images": int(test.labels.numel()),
              "ema": f"bias-corrected, decay {config.ema_decay}",
              "accuracies": list(done["accuracies"]), "seconds": list(done["seconds"])}
    for seed in range(len(result["accuracies"]), seeds):
        started = time.perf_counter()
        accuracy = evaluate_one_seed(saved["images"], saved["labels"], test, arch, seed, config)
        result["accuracies"].append(accuracy)
        result["seconds"].append(time.perf_counter() - started)
        write_json_atomic(out, result)
        log(f"eval {set_name(method, ipc, steps)} {arch} seed {seed}: {100 * accuracy:.2f}%")
    return result


def evaluate_one_seed(images, labels, test, arch: str, seed: int, config: EvalConfig) -> float:
    """Eval seed `seed` exactly as `evaluate_synthetic` runs it (the library's job for
    (arch, seed): same stream, same network draw), so a killed evaluation resumes at the next seed."""
    job = EvalJob("set", arch, seed)
    return run_job(job, EvalSet("set", images, labels, "distilled"), test.images, test.labels,
                   num_classes=NUM_CLASSES, config=config, seed=SEED)["accuracy"]


# ----------------------------------------------------------------------------- queues
def queue_main() -> None:
    """Part (b) on ConvNet: every set at IPC 1, then IPC 10 (5 seeds each). At IPC 10 every set
    gets its first 3 seeds before any gets seeds 4-5, so a cut-off leaves a complete table."""
    for method in METHODS:
        distill(method, 1)
        evaluate(method, 1, "convnet", CONVNET_SEEDS)
    for seeds in (3, CONVNET_SEEDS):
        for method in METHODS:
            distill(method, 10)
            evaluate(method, 10, "convnet", seeds)


def queue_side() -> None:
    """Part (a), part (c), then the IPC 10 sets in the reverse order of queue-main (the
    queues share them through locks) and the unseen architectures (1 seed, IPC 10)."""
    if not (RESULTS / "gradnorm.json").is_file() or len(json.loads(
            (RESULTS / "gradnorm.json").read_text())["rows"]) < len(GRADNORM_STEPS) * len(GRADNORM_SKIPS):
        gradnorm()
    for steps in STEPS_SWEEP:
        if steps != DISTILL_STEPS:
            distill("dm", 10, steps)
            evaluate("dm", 10, "convnet", STEPS_SWEEP_SEEDS, steps)
    for method in reversed(METHODS):
        distill(method, 10)
    for arch in UNSEEN_ARCHS:  # one architecture across all sets first: comparable if cut off
        for method in ("dm", "real", "pixel-dm", "dc", "mtt"):
            evaluate(method, 10, arch, UNSEEN_SEEDS)


def finish_jobs() -> list[tuple[str, int, int, str, int]]:
    """Every evaluation of part (b) and (c) as (method, ipc, T, arch, seeds), most important first:
    ConvNet at IPC 1 and 10, the T sweep, one seed per unseen architecture at IPC 10 (the
    protocol) and at IPC 1, then more unseen seeds (IPC 10 first) one seed level at a time,
    so a cut-off leaves each table even."""
    jobs = [(method, ipc, DISTILL_STEPS, "convnet", CONVNET_SEEDS) for ipc in (1, 10) for method in METHODS]
    jobs += [("dm", 10, steps, "convnet", STEPS_SWEEP_SEEDS) for steps in STEPS_SWEEP if steps != DISTILL_STEPS]
    levels = [(10, UNSEEN_SEEDS), (1, UNSEEN_SEEDS)]
    levels += [(ipc, seeds) for ipc in (10, 1) for seeds in range(UNSEEN_SEEDS + 1, UNSEEN_SEEDS_EXTENDED + 1)]
    for ipc, seeds in levels:
        jobs += [(method, ipc, DISTILL_STEPS, arch, seeds) for arch in UNSEEN_ARCHS for method in METHODS]
    return jobs


def seeds_done(method: str, ipc: int, steps: int, arch: str) -> int:
    path = RESULTS / "evals" / f"{set_name(method, ipc, steps)}_{arch}.json"
    return len(json.loads(path.read_text())["accuracies"]) if path.is_file() else 0


def queue_finish() -> None:
    """A worker over `finish_jobs()` (the sets must exist); run several side by side, one core each.
    A worker takes the first unfinished job whose (set, architecture) no other worker holds."""
    jobs = finish_jobs()
    while True:
        pending = [job for job in jobs if seeds_done(*job[:4]) < job[4]]
        if not pending:
            return
        for method, ipc, steps, arch, seeds in pending:
            lock = WORK / "locks" / f"eval-{set_name(method, ipc, steps)}-{arch}"
            if not try_lock(lock):
                continue
            try:
                evaluate(method, ipc, arch, seeds, steps)
            finally:
                lock.unlink(missing_ok=True)
            break
        else:
            time.sleep(5)  # every pending job is held by another worker


# ----------------------------------------------------------------------------- report
def load_evals(folder: str = "evals") -> dict:
    table = {}
    for path in sorted((RESULTS / folder).glob("*.json")):
        row = json.loads(path.read_text())
        table[(row["method"], row["ipc"], row["T"], row["arch"])] = row
    return table


def mean_std(values):
    """(mean, std) in percent, or None for no values."""
    if not values:
        return None
    mean, std = library_mean_std(values)
    return 100 * mean, 100 * std


def fmt(values) -> str:
    ms = mean_std(values)
    return "—" if ms is None else f"{ms[0]:.1f} ± {ms[1]:.1f} (n={len(values)})"


def report() -> str:
    lines = []
    grad_path = RESULTS / "gradnorm.json"
    if grad_path.is_file():
        rows = json.loads(grad_path.read_text())["rows"]
        steps = sorted({r["T"] for r in rows})
        # One scale for the whole table (as the paper's x 10^-4), set by the no-skip row.
        k = 1 - int(torch.tensor(max(r["grad_norm_Z"] for r in rows if r["skip"] == "none")).log10().floor())
        lines += [f"### (a) ||dL/dZ|| x 10^{k} vs T", ""]
        lines.append("| skip | k | " + " | ".join(f"T={t}" for t in steps) + " |")
        lines.append("|---" * (len(steps) + 2) + "|")
        for skip in ("none", "x0", "mean"):
            values = {r["T"]: r["grad_norm_Z"] for r in rows if r["skip"] == skip}
            if not values:
                continue
            lines.append(f"| {skip} | {k} | " + " | ".join(
                f"{values[t] * 10 ** k:.1f}" if t in values else "—" for t in steps) + " |")
        lines.append("")
    evals = load_evals()
    lines += ["### (b) test accuracy (%), mean ± std over eval seeds", ""]
    for ipc in (1, 10):
        lines.append(f"IPC {ipc}:")
        lines.append("")
        lines.append("| method | ConvNet | AlexNet | VGG-11 | ResNet-18 |")
        lines.append("|---|---|---|---|---|")
        for method in METHODS:
            cells = []
            for arch in ("convnet",) + UNSEEN_ARCHS:
                row = evals.get((method, ipc, DISTILL_STEPS, arch))  # baselines are stored with T too
                cells.append(fmt(row["accuracies"]) if row else "—")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    first = load_evals("evals-v1")
    if first:
        lines += ["### first evaluation (plain EMA, evals-v1) against the corrected one", "",
                  "| set | arch | plain EMA (v1) | corrected EMA |", "|---|---|---|---|"]
        for key, row in sorted(first.items()):
            now = evals.get(key)
            lines.append(f"| {set_name(key[0], key[1], key[2])} | {key[3]} | {fmt(row['accuracies'])} | "
                         f"{fmt(now['accuracies']) if now else '—'} |")
        lines.append("")
    lines += ["### distillation cost", "", "| set | iterations | s/iteration (median) | wall s |", "|---|---|---|---|"]
    for path in sorted((RESULTS / "distill").glob("*.json")):
        info = json.loads(path.read_text())
        if "method" not in info:
            lines.append(f"| MTT buffer ({info['num_experts']} experts x {info['epochs']} epochs, "
                         f"{info['train_images']} images) | — | — | {info['seconds']:.0f} |")
            continue
        spi = info.get("seconds_per_iteration_median")
        lines.append(f"| {path.stem} | {info['iterations']} | {'—' if spi is None else f'{spi:.2f}'} | "
                     f"{info['wall_seconds']:.0f} |")
    lines += ["", "### (c) LD3M-DM, IPC 10, vs T", "", "| T | s/iteration (median) | ConvNet accuracy (%) |",
              "|---|---|---|"]
    for steps in STEPS_SWEEP:
        info_path = RESULTS / "distill" / f"{set_name('dm', 10, steps)}.json"
        spi = json.loads(info_path.read_text())["seconds_per_iteration_median"] if info_path.is_file() else None
        row = evals.get(("dm", 10, steps, "convnet"))
        accuracies = row["accuracies"][:STEPS_SWEEP_SEEDS] if row else []
        lines.append(f"| {steps} | {'—' if spi is None else f'{spi:.2f}'} | {fmt(accuracies)} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(RESULTS / "tables.md", text)
    plots(evals)
    return text


def plots(evals) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return
    grad_path = RESULTS / "gradnorm.json"
    if grad_path.is_file():
        rows = json.loads(grad_path.read_text())["rows"]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        paper = dict(zip(GRADNORM_STEPS, (58.1, 33.5, 19.8, 15.4, 13.9, 12.1, 10.4, 8.7, 6.5)))
        for skip in ("none", "x0", "mean"):
            values = sorted((r["T"], r["grad_norm_Z"]) for r in rows if r["skip"] == skip)
            if values:
                left.plot(*zip(*values), marker="o", label=f"skip={skip}")
                base = values[0][1]
                right.plot([t for t, _ in values], [v / base for _, v in values], marker="o",
                           label=f"ours, skip={skip}")
        right.plot(list(paper), [v / paper[10] for v in paper.values()], "k--", label="paper, no skip")
        left.set(xlabel="T (DDIM steps)", ylabel="||dL/dZ||", yscale="log", title="gradient norm")
        right.set(xlabel="T (DDIM steps)", ylabel="relative to T=10", title="shape vs paper Table 1")
        left.legend()
        right.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "gradnorm.png", dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    archs = ("convnet",) + UNSEEN_ARCHS
    for ax, ipc in zip(axes, (1, 10)):
        width = 0.8 / len(METHODS)
        for i, method in enumerate(METHODS):
            means, stds, xs = [], [], []
            for j, arch in enumerate(archs):
                row = evals.get((method, ipc, DISTILL_STEPS, arch))
                if row and row["accuracies"]:
                    m, s = mean_std(row["accuracies"])
                    means.append(m)
                    stds.append(s)
                    xs.append(j + (i - len(METHODS) / 2 + 0.5) * width)
            if xs:
                ax.bar(xs, means, width, yerr=stds, label=method, capsize=2)
        ax.set_xticks(range(len(archs)), archs)
        ax.set(ylabel="test accuracy (%)", title=f"Fashion-MNIST 32², IPC {ipc}", ylim=(0, 100))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=120)
    plt.close(fig)
    points = []
    for steps in STEPS_SWEEP:
        info_path = RESULTS / "distill" / f"{set_name('dm', 10, steps)}.json"
        row = evals.get(("dm", 10, steps, "convnet"))
        if info_path.is_file() and row and row["accuracies"]:
            spi = json.loads(info_path.read_text())["seconds_per_iteration_median"]
            m, s = mean_std(row["accuracies"][:STEPS_SWEEP_SEEDS])
            points.append((steps, spi, m, s))
    if points:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        left.set(xlabel="T", ylabel="seconds / iteration", title="LD3M-DM IPC 10: cost")
        right.errorbar([p[0] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                       marker="o", capsize=3)
        right.set(xlabel="T", ylabel="ConvNet accuracy (%)", title="LD3M-DM IPC 10: accuracy")
        fig.tight_layout()
        fig.savefig(RESULTS / "steps.png", dpi=120)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("gradnorm")
    sub.add_parser("buffer")
    for name in ("distill", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("method", choices=METHODS)
        p.add_argument("ipc", type=int)
        p.add_argument("--steps", type=int, default=DISTILL_STEPS)
        if name == "evaluate":
            p.add_argument("--arch", default="convnet")
            p.add_argument("--seeds", type=int, default=CONVNET_SEEDS)
    sub.add_parser("queue-main")
    sub.add_parser("queue-side")
    sub.add_parser("queue-finish")
    sub.add_parser("report")
    args = parser.parse_args()
    if args.command == "gradnorm":
        gradnorm()
    elif args.command == "buffer":
        build_mtt_buffer()
    elif args.command == "distill":
        distill(args.method, args.ipc, args.steps)
    elif args.command == "evaluate":
        evaluate(args.method, args.ipc, args.arch, args.seeds, args.steps)
    elif args.command == "queue-main":
        queue_main()
    elif args.command == "queue-side":
        queue_side()
    elif args.command == "queue-finish":
        queue_finish()
    else:
        print(report())


if __name__ == "__main__":
    main()
