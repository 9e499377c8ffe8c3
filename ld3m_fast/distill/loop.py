"""The one distillation loop, its run folder and its resumable checkpoints.

Per iteration k (1-based):
    noise  = gen.draw_noise(N, noise_generator)         # drawn once, reused by every pass
    images = gen(Z, c, noise)                            # autograd-aware in every grad mode
    loss, dL/dimages = algorithm.image_gradient(images.detach(), labels, ctx)
    images.backward(dL/dimages)                          # back through the generator to Z, c
    SGD(momentum 0.5) step on Z, c (and MTT's student lr)

Run folder (RUN_DIR):
    config.json              the resolved configuration
    metrics.jsonl            one JSON object per iteration (and per inline evaluation)
    tb/                      TensorBoard scalars
    images/iter_XXXXXX.png   image grids (rows = classes) every `image_every` iterations
    checkpoint.safetensors   Z, c, labels, optimiser state, student lr, iteration and every
                             generator state (noise, algorithm, DSA); written atomically
    final/                   images.safetensors (images, labels, the export noise),
                             images.png, synthetic.safetensors (latents: SyntheticSet.save)

Resolution (`render_size`): up to the prior's native size the chain renders at `res`
itself (latents of side res / latent factor: cin256-v2 at 128² uses 3×32×32, as
in the paper); above it, the prior renders natively and an antialiased,
differentiable bilinear resize inside the generator (`output_size`) reaches `res`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .._files import atomic_write, write_text_atomic
from .._files import save_tensors_atomic as _save_tensors
from ..errors import LD3MError
from ..normalization import denormalize_unit
from .algorithms import (ALGORITHMS, MTT_GRADIENTS, NetworkSpec, RealData, StepContext, build_algorithm,
                         stream_generator)

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "ld3m-fast-checkpoint"
GRAD_MODES = ("autograd", "released", "recompute")
SKIPS = ("x0", "mean", "none")
# Settings that may change when a run is resumed; everything else must stay as it was.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESUME_OVERRIDES = ("iterations", "save_every", "image_every", "eval_every", "device", "progress",
                    "compile", "compile_backend", "profile",
                    "eval_archs", "eval_epochs", "eval_seeds")


@dataclass
class DistillConfig:
    """Everything that defines a distillation run (the CLI flags, one field each)."""

    data: str = "fashion-mnist"
    subset: str | None = None
    prior: str | None = None         # None: the embedded default prior (Fashion-MNIST, 32²)
    algorithm: str = "dm"
    res: int | None = None            # None: the prior's native size
    ipc: int = 1
    steps: int = 10
    guidance: float = 3.0
    skip: str = "x0"                  # "x0", "mean" or "none"
    eta: float = 0.0
    grad_mode: str = "recompute"
    chunk: int | str | None = None    # images per generator chunk, or "auto" (the planner picks)
    memory_budget: str | None = None  # for --chunk auto: e.g. "24GiB" (default: the device's memory)
    dtype: str = "fp32"               # "bf16": autocast; the latent chain and Z, c stay fp32
    compile: bool = False             # torch.compile the denoiser, decoder and distillation network
    compile_backend: str = "inductor"
    profile: int = 0                  # N > 0: torch.profiler trace of iterations 2..N+1 in RUN/profile
    iterations: int | None = None     # None: 10000 (the paper's), 120 on the embedded default
    lr_latent: float | None = None    # None: the algorithm's default (DM 1, DC 0.1, MTT 1000;
                                      # DM 0.1 on the embedded default prior)
    lr_class: float | None = None
    lr_student: float = 1e-6
    momentum: float = 0.5
    seed: int = 0
    out: str | None = None
    buffer: str | None = None
    mtt_gradient: str = "truncated"
    syn_steps: int = 10
    expert_epochs: int = 2
    max_start_epoch: int = 2
    student_lr: float = 0.01
    batch_real: int | None = None     # None: 256 (released), 64 on the embedded default
    batch_syn: int | None = None
    micro_batch: int | None = None
    dsa: str = "color_crop_cutout_flip_scale_rotate"   # "none" disables augmentation
    width: int = 128
    depth: int | None = None
    norm: str = "instance"
    eval_every: int = 0               # 0: no inline evaluation
    eval_archs: str = "convnet"
    eval_epochs: int = 300
    eval_seeds: int = 1
    save_every: int = 100
    image_every: int = 100
    device: str = "cpu"
    cache_dir: str | None = None
    max_per_class: int | None = None
    progress: bool = True

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "config") -> "DistillConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise LD3MError(f"unknown key {unknown[0]!r} in {where}; known keys: "
                            + ", ".join(cls.field_names()))
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject impossible settings with one clear line each."""
        checks = [
            (self.algorithm in ALGORITHMS, f"unknown --algorithm {self.algorithm!r}; choose dm, dc or mtt"),
            (self.skip in SKIPS, f"unknown --skip {self.skip!r}; choose x0, mean or none"),
            (self.grad_mode in GRAD_MODES, f"unknown --grad-mode {self.grad_mode!r}; choose "
                                           + ", ".join(GRAD_MODES)),
            (self.mtt_gradient in MTT_GRADIENTS, f"unknown --mtt-gradient {self.mtt_gradient!r}; "
                                                 "choose truncated or full"),
            (self.ipc >= 1, f"--ipc must be >= 1, got {self.ipc}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.iterations >= 0, f"--iterations must be >= 0, got {self.iterations}"),
            (self.chunk in (None, "auto") or (isinstance(self.chunk, int) and self.chunk >= 1),
             f"--chunk must be >= 1 or auto, got {self.chunk}"),
            (self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}; choose fp32 or bf16"),
            (self.profile >= 0, f"--profile must be >= 0, got {self.profile}"),
            (self.save_every >= 1 and self.image_every >= 1, "--save-every and --image-every must be >= 1"),
            (self.eval_every >= 0, "--eval-every must be >= 0 (0 = off)"),
            (self.res is None or self.res >= 8, f"--res must be >= 8, got {self.res}"),
            (self.eta >= 0, f"--eta must be >= 0, got {self.eta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LD3MError(message)
        if self.prior is None or self.iterations is None or self.batch_real is None:
            raise ValueError("unresolved defaults: call resolve_defaults(config) first")
        if self.algorithm == "mtt" and not self.buffer:
            raise LD3MError("--algorithm mtt needs --buffer PATH (build one with `ld3m-fast buffer`)")


# Defaults that depend on the prior. The embedded default (a 32² Fashion-MNIST prior)
# runs end to end in a few minutes on a laptop CPU; a user's prior gets the paper's.
# (At --res 256 the 28-px data are upsampled once and cached: 500 per class keep that ~1 GB.)
# A dict value is per algorithm. DM's released lr 1 is tuned to cin256's 3x64x64 latents: on the
# embedded prior's 4x8x8 ones (DM gradient norm ~90 at the start) it decodes to images 2.6x the
# data's spread after 120 iterations; 0.1 keeps them in range, ends at a lower loss and tests
# as well (docs/default_prior.md).
EMBEDDED_PROFILE = {"iterations": 120, "batch_real": 64, "max_per_class": 500,
                    "lr_latent": {"dm": 0.1}, "lr_class": {"dm": 0.1}}
PAPER_PROFILE = {"iterations": 10000, "batch_real": 256, "max_per_class": None}


def resolve_defaults(config: DistillConfig, *, log=print) -> DistillConfig:
    """Fill the prior-dependent defaults (prior, iterations, batch_real, the embedded prior's
    DM learning rates) and the run folder."""
    values = config.to_dict()
    profile = PAPER_PROFILE
    if values["prior"] is None:
        from ..priors.default import default_prior_path

        values["prior"] = str(default_prior_path())
        profile = EMBEDDED_PROFILE
        log("using the embedded default prior (Fashion-MNIST 32², see docs/default_prior.md)")
    for key, value in profile.items():
        if isinstance(value, dict):
            value = value.get(values["algorithm"])
        if values[key] is None:
            values[key] = value
    if not values["out"]:
        values["out"] = str(Path("runs") / time.strftime("distill-%Y%m%d-%H%M%S"))
    return DistillConfig(**values)


# --------------------------------------------------------------------------- small helpers


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Network-input images (B, 3, H, W) -> uint8 (B, 3, H, W), clamped to [0, 255]."""
    return (denormalize_unit(images.detach().float().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)


def save_image_grid(images: torch.Tensor, path, columns: int) -> None:
    """Save network-input images (B, 3, H, W) as one PNG, `columns` images per row (atomic)."""
    from PIL import Image

    pixels = to_uint8_images(images)
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


def load_config(run_dir) -> DistillConfig:
    """The resolved config of an existing run folder."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise LD3MError(f"{run_dir} is not an ld3m-fast run folder (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    return DistillConfig.from_dict(values, where=str(path))


# --------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything a run needs, built and validated before anything is written."""

    config: DistillConfig
    prior: object
    generator: object
    synthetic: object
    algorithm: object
    real: RealData
    class_names: list[str]
    device: torch.device
    res: int
    dsa: object | None = None


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LD3MError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LD3MError(f"--device {name} asked for but no CUDA device is available; use --device cpu")
    return device


def resolve_resolution(prior, res: int | None) -> int:
    """The output side: `res` or the prior's native size; must be a multiple of the latent factor."""
    res = prior.image_size if res is None else int(res)
    factor = prior.latent_factor
    if res % factor:
        raise LD3MError(f"--res {res} is not a multiple of the prior's latent factor {factor}; "
                        f"use e.g. {prior.image_size} (the prior's native size)")
    return res


def render_size(prior, res: int) -> int:
    """Side the chain renders at: `res` up to the prior's native size, the native size above it
    (a denoiser never saw latents larger than its training size)."""
    return min(res, prior.image_size)


def prior_class_rows(prior, subset: str | None, num_classes: int) -> list[int]:
    """The prior's class-table row for each dataset label."""
    if subset is not None and prior.num_classes == 1000:
        from ..data.subsets import resolve_subset

        return list(resolve_subset(subset).imagenet_indices)
    if num_classes > prior.num_classes:
        raise LD3MError(f"the data has {num_classes} classes but the prior only {prior.num_classes}; "
                        "use a prior trained on these classes")
    return list(range(num_classes))


def device_memory(device: torch.device) -> int:
    """Bytes a run may plan for: the GPU's memory, or 80% of the machine's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def choose_chunk(config: DistillConfig, res: int, num_classes: int, device, *, log=print) -> int:
    """--chunk auto: the planner's cheapest chunk that fits the memory budget."""
    from ..planner.plan import format_bytes, parse_bytes, plan
    from ..planner.simulate import IterationSpec

    budget = parse_bytes(config.memory_budget) if config.memory_budget else device_memory(device)
    spec = IterationSpec(
        prior=config.prior, res=res, ipc=config.ipc, num_classes=num_classes, steps=config.steps,
        guidance=config.guidance, skip=None if config.skip == "none" else config.skip,
        algorithm=config.algorithm, grad_mode=config.grad_mode, micro_batch=config.micro_batch,
        dtype=config.dtype, syn_steps=config.syn_steps, mtt_gradient=config.mtt_gradient,
        batch_real=config.batch_real, width=config.width, depth=config.depth)
    _, best = plan(spec, budget, dtypes=(config.dtype,))
    if best is None:
        raise LD3MError(f"--chunk auto: no chunk size fits {format_bytes(budget)}; set --micro-batch, "
                        "lower --ipc or raise --memory-budget")
    log(f"--chunk auto: chunk {best.estimate.spec.chunk} (planned peak "
        f"{format_bytes(best.estimate.peak_bytes)} of {format_bytes(budget)})")
    return best.estimate.spec.chunk


def use_memory_efficient_attention(prior, device: torch.device, *, log=print) -> str:
    """xformers attention on CUDA when it is installed; PyTorch SDPA otherwise (diffusers' default)."""
    if device.type != "cuda":
        return "sdpa"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "sdpa"
    for model in (prior.denoiser.model, prior.autoencoder.model):
        if hasattr(model, "enable_xformers_memory_efficient_attention"):
            model.enable_xformers_memory_efficient_attention()
    log("attention: xformers (memory-efficient) on CUDA")
    return "xformers"


def compile_prior(prior, backend: str) -> None:
    """torch.compile the denoiser and the decoder in place (the encoder runs once, at init)."""
    prior.denoiser.model.compile(backend=backend)
    prior.autoencoder.model.decoder.compile(backend=backend)


def build_setup(config: DistillConfig, *, log=print) -> Setup:
    """Load the prior, data and buffer and build generator, synthetic set and algorithm.

    Pure: writes nothing (except the data module's decode cache), so bad input
    fails before a run folder exists.
    """
    from ..data import load_dataset, require_per_class
    from ..dsa import DSA
    from ..generator import LD3MGenerator
    from ..priors import load_prior
    from ..synthetic import SyntheticSet
    from .buffers import load_buffer

    config.validate()
    device = resolve_device(config.device)
    try:
        dsa = DSA(config.dsa) if config.dsa not in (None, "", "none") else None
    except ValueError as error:
        raise LD3MError(f"--dsa: {error}") from None
    prior_path = Path(config.prior)
    if not prior_path.exists():
        raise LD3MError(f"prior folder {prior_path} does not exist; pass --prior PATH")
    prior = load_prior(prior_path).to(device)
    res = resolve_resolution(prior, config.res)
    data = load_dataset(config.data, split="train", subset=config.subset, res=res,
                        cache_dir=config.cache_dir, max_per_class=config.max_per_class, log=log)
    require_per_class(data, config.ipc)
    rows = prior_class_rows(prior, config.subset, data.num_classes)
    init_generator = stream_generator(config.seed, "init")
    render = render_size(prior, res)
    synthetic = SyntheticSet.from_real(prior, data.images, data.labels, config.ipc, init_generator,
                                       prior_classes=rows, image_size=render).to(device)
    chunk = choose_chunk(config, res, data.num_classes, device, log=log) if config.chunk == "auto" else config.chunk
    use_memory_efficient_attention(prior, device, log=log)
    if config.compile:
        compile_prior(prior, config.compile_backend)
    generator = LD3MGenerator(prior, config.steps, guidance=config.guidance,
                              skip=None if config.skip == "none" else config.skip, eta=config.eta,
                              grad_mode=config.grad_mode, chunk_size=chunk,
                              render_size=render, output_size=None if res == render else res)
    network = NetworkSpec(num_classes=data.num_classes, res=res, width=config.width, depth=config.depth,
                          norm=config.norm,
                          compile_backend=config.compile_backend if config.compile else None)
    network.build()  # an unknown norm or an impossible depth fails now, not at iteration 1
    trajectories = None
    if config.algorithm == "mtt":
        expect = {"arch": network.arch, "depth": network.depth, "width": network.width,
                  "norm": network.norm, "res": res, "num_classes": data.num_classes,
                  "channels": network.channels}
        trajectories = load_buffer(config.buffer, expect=expect)
    algorithm = build_algorithm(
        config.algorithm, network, trajectories=trajectories, batch_real=config.batch_real,
        micro_batch=config.micro_batch,
        **({} if config.algorithm != "mtt" else dict(
            syn_steps=config.syn_steps, expert_epochs=config.expert_epochs,
            max_start_epoch=config.max_start_epoch, student_lr=config.student_lr,
            gradient=config.mtt_gradient, batch_syn=config.batch_syn)))
    algorithm.to(device)
    real = RealData(data.images, data.labels, data.num_classes)
    return Setup(config, prior, generator, synthetic, algorithm, real, list(data.class_names), device, res, dsa)


# --------------------------------------------------------------------------- the run


class Distiller:
    """One distillation run over a `Setup`, writing into `run_dir`."""

    def __init__(self, setup: Setup, run_dir, *, log=print):
        self.setup = setup
        self.config = setup.config
        self.run_dir = Path(run_dir)
        self.log = log
        config = self.config
        algorithm = setup.algorithm
        lr_latent = algorithm.default_lr_latent if config.lr_latent is None else config.lr_latent
        lr_class = algorithm.default_lr_class if config.lr_class is None else config.lr_class
        groups = [{"params": [setup.synthetic.Z], "lr": lr_latent},
                  {"params": [setup.synthetic.c], "lr": lr_class}]
        if algorithm.parameters():
            groups.append({"params": algorithm.parameters(), "lr": config.lr_student})
        self.optimizer = torch.optim.SGD(groups, lr=lr_latent, momentum=config.momentum)
        # Three independent streams, all CPU generators (device-independent, resumable):
        self.noise_generator = stream_generator(config.seed, "noise")
        self.algorithm_generator = stream_generator(config.seed, "algorithm")
        self.dsa_generator = stream_generator(config.seed, "dsa")
        self.context = StepContext(real=setup.real, generator=self.algorithm_generator, dsa=setup.dsa,
                                   dsa_generator=self.dsa_generator, device=setup.device)
        self.iteration = 0
        self.last_checkpoint = None
        self._writer = None
        self._test_set = None

    # -- state

    def state_tensors(self) -> tuple[dict, dict]:
        """(tensors, metadata) that fully determine the rest of the run."""
        syn = self.setup.synthetic
        tensors = {"Z": syn.Z.detach(), "c": syn.c.detach(), "labels": syn.labels,
                   "rng.noise": self.noise_generator.get_state(),
                   "rng.algorithm": self.algorithm_generator.get_state(),
                   "rng.dsa": self.dsa_generator.get_state()}
        for i, p in enumerate(self.setup.algorithm.parameters()):
            tensors[f"algorithm.{i}"] = p.detach()
        optimizer_state = self.optimizer.state_dict()
        state_keys = {}
        for index, state in optimizer_state["state"].items():
            state_keys[str(index)] = sorted(state)
            for key, value in state.items():
                tensors[f"optimizer.{index}.{key}"] = value
        metadata = {"format": CHECKPOINT_FORMAT, "iteration": str(self.iteration),
                    "optimizer_groups": json.dumps(optimizer_state["param_groups"]),
                    "optimizer_state_keys": json.dumps(state_keys),
                    "config": json.dumps(self.config.to_dict())}
        return tensors, metadata

    def save_checkpoint(self) -> Path:
        tensors, metadata = self.state_tensors()
        path = self.run_dir / CHECKPOINT
        _save_tensors(tensors, path, metadata)
        self.last_checkpoint = self.iteration
        return path

    def load_checkpoint(self) -> None:
        """Restore the state written by `save_checkpoint`; anything off is an LD3MError."""
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            raise LD3MError(f"{self.run_dir} has no {CHECKPOINT} to resume from")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not an ld3m-fast checkpoint")
            iteration = int(metadata["iteration"])
            groups = json.loads(metadata["optimizer_groups"])
            state_keys = json.loads(metadata["optimizer_state_keys"])
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            raise LD3MError(f"checkpoint {path} is corrupt or unreadable ({error}); "
                            "delete the run folder and start again") from None
        syn = self.setup.synthetic
        params = self.setup.algorithm.parameters()
        expected = {"Z": syn.Z.shape, "c": syn.c.shape, "labels": syn.labels.shape,
                    **{f"algorithm.{i}": p.shape for i, p in enumerate(params)}}
        for key, shape in expected.items():
            if key not in tensors or tensors[key].shape != shape:
                found = tuple(tensors[key].shape) if key in tensors else "missing"
                raise LD3MError(f"checkpoint {path} does not fit this run: {key} is {found}, "
                                f"expected {tuple(shape)}")
        try:
            with torch.no_grad():
                syn.Z.copy_(tensors["Z"])
                syn.c.copy_(tensors["c"])
                for i, p in enumerate(params):
                    p.copy_(tensors[f"algorithm.{i}"])
            if not torch.equal(syn.labels.cpu(), tensors["labels"]):
                raise ValueError("labels differ")
            state = {int(i): {k: tensors[f"optimizer.{i}.{k}"].to(self.setup.device) for k in keys}
                     for i, keys in state_keys.items()}
            self.optimizer.load_state_dict({"state": state, "param_groups": groups})
            self.noise_generator.set_state(tensors["rng.noise"])
            self.algorithm_generator.set_state(tensors["rng.algorithm"])
            self.dsa_generator.set_state(tensors["rng.dsa"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise LD3MError(f"checkpoint {path} is corrupt or does not fit this run ({error})") from None
        self.iteration = iteration
        self.last_checkpoint = iteration

    # -- logging

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    def log_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["iteration"]
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def trim_metrics(self) -> None:
        """Drop metric lines written after the checkpoint we resume from (no duplicates)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= self.iteration:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    # -- one iteration

    def step(self) -> dict:
        """Run iteration `self.iteration + 1` (`distill_iteration`, the path the planner
        measures too); returns its metrics."""
        from .iteration import distill_iteration

        setup = self.setup
        syn = setup.synthetic
        started = time.perf_counter()
        # Drawn on the CPU generator, then moved: the same noise on every device.
        noise = setup.generator.draw_noise(len(syn), self.noise_generator, device="cpu").to(setup.device)
        with torch.autocast(setup.device.type, dtype=DTYPES[self.config.dtype],
                            enabled=self.config.dtype != "fp32"):
            loss, images = distill_iteration(setup.generator, syn, setup.algorithm, self.context,
                                             self.optimizer, noise, check=self._check_finite)
        # A finite loss can still send a non-finite gradient through the chain: then the
        # parameters are no longer finite and this iteration must not be checkpointed.
        if not all(bool(torch.isfinite(p).all()) for group in self.optimizer.param_groups
                   for p in group["params"]):
            self._stop("the latents became non-finite")
        self.iteration += 1
        self._last_images = images
        record = {"iteration": self.iteration, "loss": float(loss),
                  "grad_norm_Z": float(syn.Z.grad.norm()) if syn.Z.grad is not None else 0.0,
                  "grad_norm_c": float(syn.c.grad.norm()) if syn.c.grad is not None else 0.0,
                  "seconds": time.perf_counter() - started}
        for i, p in enumerate(setup.algorithm.parameters()):
            record["student_lr" if i == 0 else f"algorithm_param_{i}"] = float(p.detach())
        return record

    def _check_finite(self, loss, image_grad) -> None:
        """Stop before anything is pushed back when the loss or dL/dimages is NaN/inf."""
        if not math.isfinite(float(loss)):
            self._stop(f"the loss became {float(loss)}")
        if not bool(torch.isfinite(image_grad).all()):
            self._stop("the image gradient became non-finite")

    def _stop(self, what: str):
        raise LD3MError(
            f"{what} at iteration {self.iteration + 1}; stopped. The last good checkpoint "
            f"(iteration {self.last_checkpoint}) is in {self.run_dir / CHECKPOINT}; "
            "lower --lr-latent/--lr-class")

    # -- the loop

    def run(self, *, on_iteration=None) -> None:
        """Iterate up to `config.iterations`, checkpointing and logging as configured."""
        config = self.config
        total = config.iterations
        bar = None
        # Opened before the first step: TensorBoard drops events of iterations a killed run
        # logged after its last checkpoint (purge_step), so curves have no duplicates.
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.iteration + 1)
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.iteration, desc="distill", unit="it", dynamic_ncols=True)
        profiler = self._profiler()
        try:
            while self.iteration < total:
                record = self.step()
                if profiler is not None:
                    profiler.step()
                self.log_metrics(record)
                k = self.iteration
                if k % config.image_every == 0 or k == total:
                    save_image_grid(self._last_images, self.run_dir / "images" / f"iter_{k:06d}.png",
                                    self.setup.synthetic.ipc)
                if config.eval_every and k % config.eval_every == 0:
                    self.inline_eval()
                if k % config.save_every == 0 or k == total:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if on_iteration is not None:
                    on_iteration(k)
        finally:
            if profiler is not None:
                profiler.stop()
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _profiler(self):
        """--profile N: a torch.profiler trace of N iterations after one warm-up, written to
        RUN_DIR/profile for TensorBoard's profiler plugin (pip install torch-tb-profiler)."""
        if not self.config.profile:
            return None
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.setup.device.type == "cuda" else [])
        profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=self.config.profile,
                                                                    repeat=1),
                           on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile")),
                           record_shapes=True, profile_memory=True)
        profiler.start()
        return profiler

    def inline_eval(self) -> dict:
        from ..data import load_dataset
        from .evaluation import EvalConfig, evaluate_synthetic

        config = self.config
        if self._test_set is None:
            self._test_set = load_dataset(config.data, split="test", subset=config.subset, res=self.setup.res,
                                          cache_dir=config.cache_dir, log=self.log)
        images, labels, _ = self.render_final()
        eval_config = EvalConfig(archs=tuple(config.eval_archs.split(",")), epochs=config.eval_epochs,
                                 seeds=config.eval_seeds, width=config.width, depth=config.depth,
                                 norm=config.norm)
        result = evaluate_synthetic(images, labels, self._test_set.images, self._test_set.labels,
                                    num_classes=self.setup.real.num_classes, config=eval_config,
                                    seed=config.seed, device=self.setup.device)
        record = {"iteration": self.iteration, "eval": result}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for arch, row in result["per_arch"].items():
            self.writer.add_scalar(f"eval/{arch}", row["mean"], self.iteration)
        return result

    @torch.no_grad()
    def render_final(self):
        """Render the current synthetic set with the fixed export noise.

        Returns (images (N, 3, res, res) float network input, labels (N,), noise).
        The export noise comes from its own generator seeded by the run seed, so
        re-rendering from the saved latents and noise gives the same images.
        """
        syn = self.setup.synthetic
        export_generator = stream_generator(self.config.seed, "export")
        noise = self.setup.generator.draw_noise(len(syn), export_generator, device="cpu")
        images = self.setup.generator(syn.Z, syn.c, noise.to(self.setup.device))
        return images.cpu(), syn.labels.cpu(), noise

    def export(self) -> Path:
        """Write final/: images + labels (safetensors, PNG grid) and the latents."""
        final = self.run_dir / "final"
        images, labels, noise = self.render_final()
        tensors = {"images": images, "labels": labels, "noise_start": noise.start}
        if noise.steps is not None:
            tensors["noise_steps"] = noise.steps
        meta = {"format": "ld3m-fast-images", "iteration": str(self.iteration), "res": str(self.setup.res),
                "class_names": json.dumps(self.setup.class_names),
                "normalization": "ld3m_fast.normalization (network input)"}
        _save_tensors(tensors, final / "images.safetensors", meta)
        save_image_grid(images, final / "images.png", self.setup.synthetic.ipc)
        self.setup.synthetic.save(final / "synthetic.safetensors",
                                  metadata={"iteration": self.iteration, "config": self.config.to_dict()})
        return final


# --------------------------------------------------------------------------- entry points


def start_run(config: DistillConfig, *, log=print, on_iteration=None) -> Distiller:
    """Validate everything, then create the run folder and distill to the end."""
    config = resolve_defaults(config, log=log)
    run_dir = Path(config.out)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise LD3MError(f"{run_dir} already exists and is not empty; continue it with --resume {run_dir} "
                        "or choose another --out")
    setup = build_setup(config, log=log)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    distiller = Distiller(setup, run_dir, log=log)
    distiller.save_checkpoint()  # iteration 0: a NaN at iteration 1 still leaves a checkpoint
    return _finish(distiller, on_iteration)


def resume_run(run_dir, overrides: dict | None = None, *, log=print, on_iteration=None) -> Distiller:
    """Continue a run from its checkpoint (same seed, same tensors as an uninterrupted run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LD3MError(f"cannot resume: {run_dir} does not exist")
    config = load_config(run_dir)
    values = config.to_dict()
    for key, value in (overrides or {}).items():
        if key not in values:
            raise LD3MError(f"unknown setting {key!r}")
        if value != values[key]:
            if key not in RESUME_OVERRIDES:
                raise LD3MError(f"cannot change {key} when resuming (run has {values[key]!r}, got {value!r}); "
                                f"only {', '.join(RESUME_OVERRIDES)} may change")
            values[key] = value
    config = DistillConfig.from_dict(values)
    setup = build_setup(config, log=log)
    distiller = Distiller(setup, run_dir, log=log)
    distiller.load_checkpoint()
    if config.to_dict() != load_config(run_dir).to_dict():
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    distiller.trim_metrics()
    log(f"resuming {run_dir} at iteration {distiller.iteration} of {config.iterations}")
    return _finish(distiller, on_iteration)


def _finish(distiller: Distiller, on_iteration) -> Distiller:
    distiller.run(on_iteration=on_iteration)
    distiller.export()
    run_dir = distiller.run_dir
    distiller.log(f"done: {distiller.iteration} iterations in {run_dir}\n"
                  f"  images:        {run_dir / 'final' / 'images.png'}\n"
                  f"  synthetic set: {run_dir / 'final' / 'synthetic.safetensors'} (latents), "
                  f"{run_dir / 'final' / 'images.safetensors'} (images + labels)\n"
                  f"  metrics:       {run_dir / 'metrics.jsonl'} (TensorBoard: {run_dir / 'tb'})")
    return distiller


def load_final(run_dir):
    """(images float (N,3,res,res), labels (N,), metadata) of a finished run's export."""
    path = Path(run_dir) / "final" / "images.safetensors"
    if not path.is_file():
        raise LD3MError(f"{run_dir} has no final export ({path}); finish the run with --resume {run_dir}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
    except (SafetensorError, OSError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    return images, labels, metadata


__all__ = ["DistillConfig", "Distiller", "Setup", "build_setup", "load_config", "load_final",
           "resume_run", "save_image_grid", "start_run"]
