"""Distillation algorithms as small objects behind one interface.

The loop renders the synthetic images, hands them (detached) to an algorithm,
gets back the loss value and dL/dimages, and pushes that gradient back through
the generator. Keeping the algorithms ignorant of the generator is what lets
every gradient mode of the generator (autograd, released, recompute) share the
same loop: the released code's "render, get dL/dimage, re-render" scheme needs
exactly dL/dimages.

    loss, grad = algorithm.image_gradient(images, labels, ctx)
        images: (B, 3, H, W) float, in the shared normalisation (network input)
        labels: (B,) long
        grad:   (B, 3, H, W), same dtype/device as images

Algorithms with learnable state of their own (MTT's student learning rate)
expose it through `parameters()` and fill its `.grad` during `image_gradient`.

Randomness: every draw (network init, real batches, expert choice, DSA) comes
from `ctx.stream(purpose, key)`, never from the global RNG. A run's context has a seed:
each (iteration, purpose, class or student step) then gets a fresh generator of its
own (`stream_generator`), so a draw does not depend on which process makes it or on
what was drawn before: the result is independent of the world size, and a checkpoint
needs only the iteration. Without a seed (tests, the planner) the two sequential
generators `ctx.generator` / `ctx.dsa_generator` serve every purpose, in the same order.

Distributed (`ld3m_fast.distributed`): the loop hands an algorithm only this rank's
images (`ctx.rows` of the whole set); DM and DC are per class and sum their loss over
the ranks; MTT splits every student step's batch by owner and all-reduces the step's
parameter gradient (`ctx.comm`).

The losses themselves are `ld3m_fast.losses` (dm_loss, dc_loss, mtt_loss and their
pieces): these objects draw what an iteration needs and call them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from .._host import draw_int, host_values
from ..choices import ALGORITHMS, MTT_GRADIENTS
from ..data.imageset import indices_by_class
from ..errors import LD3MError
from ..losses import (FlatNetwork, RealBlock, augment, class_groups, dc_class_term, default_real_batch,
                      dm_loss_from_blocks, draw_for_class, gradient_distance, micro_batches, mtt_loss_from_plan,
                      mtt_plan)
from ..normalization import from_uint8

# --------------------------------------------------------------------------- context


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one named random stream, independent of every other stream/seed pair."""
    digest = hashlib.sha256(f"ld3m-fast:{seed}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def iteration_stream(seed: int, iteration: int, purpose: str, key=None) -> torch.Generator:
    """The generator of one (iteration, purpose[, class or step]) of a run (stateless)."""
    name = f"iteration:{iteration}:{purpose}" + ("" if key is None else f":{key}")
    return stream_generator(seed, name)


def class_rows(labels: torch.Tensor, classes: range) -> slice:
    """The rows of the images of `classes` in a class-major set with `labels`: one slice."""
    from .._host import host_values

    with host_values():
        mine = torch.nonzero((labels.cpu() >= classes.start) & (labels.cpu() < classes.stop)).flatten()
        start, stop = int(mine[0]), int(mine[-1]) + 1
    if stop - start != mine.numel():
        raise ValueError("the synthetic set is not in class-major order")
    return slice(start, stop)


def class_noise(generator, labels: torch.Tensor, seed: int, stream: str, *, device="cpu"):
    """Chain noise for images with `labels` (class-major, contiguous classes), one stream per
    class: `stream:CLASS` of `seed`. Any process drawing a class gets the same noise.

    Returns a `ChainNoise` for labels.shape[0] images, drawn on the CPU and moved to `device`.
    """
    from ..generator import ChainNoise

    starts, steps = [], []
    for cls, index in class_groups(labels):
        noise = generator.draw_noise(index.numel(), stream_generator(seed, f"{stream}:{cls}"), device="cpu")
        starts.append(noise.start)
        steps.append(noise.steps)
    noise = ChainNoise(torch.cat(starts), None if steps[0] is None else torch.cat(steps, dim=1))
    return noise.to(device)


class RealData:
    """The real training images, indexed by class, sampled with an explicit generator.

    images: (N, 3, res, res) uint8 (kept as uint8: 4x less memory than float), held as
    given (a tensor memory-mapped from the data cache stays on disk).
    labels: (N,) long in [0, num_classes); global class indices, so a process may hold
    only its share of the classes (`load_dataset(..., classes=...)`): the others have no
    images here.
    rows: optional reader of the same rows by file reads (`ImageSet.rows`); `load` then
    reads exactly the rows it returns and nothing stays mapped (`from_imageset` passes it).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, rows=None):
        if images.dtype != torch.uint8:
            raise ValueError(f"real images must be uint8, got {images.dtype}")
        self.images = images
        self.rows = rows
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.class_indices = indices_by_class(self.labels, self.num_classes)

    @classmethod
    def from_imageset(cls, data) -> "RealData":
        """The real data of an `ImageSet` (all of it, or the share it holds), read through its
        cache file when it has one."""
        return cls(data.images, data.labels, data.num_classes, rows=data.rows)

    def sample(self, cls: int, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """`count` random images of class `cls` (without replacement when possible),
        as network input (count', 3, res, res) float32 on `device`; count' = min(count, available)."""
        return self.load(self.draw(cls, count, generator), device)

    def draw(self, cls: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """The indices `sample` would load: (count',) long, drawn from `generator` as `sample` does."""
        pool = self.class_indices[cls]
        if len(pool) == 0:
            raise LD3MError(f"class {cls} has no real images")
        order = torch.randperm(len(pool), generator=generator)[: min(count, len(pool))]
        return pool[order]

    def load(self, index: torch.Tensor, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images `index` (from `draw`) as network input (n, 3, res, res) on `device`."""
        picked = self.rows[index] if self.rows is not None else self.images[index]
        return from_uint8(picked, dtype).to(device)


@dataclass
class StepContext:
    """What an algorithm may use besides the synthetic images.

    Randomness (`stream`): with `seed` set (a run), every (iteration, purpose, key) has
    its own CPU generator derived from the seed; without it, `generator` drives network
    inits, real batches, expert choice and student batches and `dsa_generator` the
    augmentation draws, consumed in sequence. CPU generators either way: reproducible
    across devices.

    Distributed: `rows` is the slice of the whole synthetic set (`total_images` images)
    whose images this process renders (None: all of them); `comm` the process group
    (`ld3m_fast.distributed`; a no-op `Single` by default).
    """

    real: RealData | None
    generator: torch.Generator | None = None
    dsa: object | None = None
    dsa_generator: torch.Generator | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int | None = None
    iteration: int = 0
    rows: slice | None = None
    total_images: int | None = None
    comm: object = field(default_factory=lambda: _single())

    def stream(self, purpose: str, key=None) -> torch.Generator:
        """The generator for `purpose` ("network", "real", "dsa", "expert", "batch") of this
        iteration, keyed by class or student step."""
        if self.seed is None:
            generator = self.dsa_generator if purpose == "dsa" else self.generator
            if generator is None:
                what = "an explicit dsa_generator" if purpose == "dsa" else "an explicit generator"
                raise LD3MError(f"{purpose} draws need {what} (a torch.Generator) or a seed")
            return generator
        return iteration_stream(self.seed, self.iteration, purpose, key)

    def whole(self, count: int) -> int:
        """The number of images of the whole synthetic set, given this process's `count`."""
        return count if self.total_images is None else int(self.total_images)

    def first_row(self) -> int:
        return 0 if self.rows is None else int(self.rows.start or 0)


def _single():
    from ..distributed import Single

    return Single()


@dataclass
class NetworkSpec:
    """Which network an algorithm draws (ConvNet by default, as in the paper)."""

    num_classes: int
    res: int
    arch: str = "convnet"
    width: int = 128
    depth: int | None = None
    norm: str | None = None           # None: the architecture's released default
    channels: int = 3
    compile_backend: str | None = None  # torch.compile every network built (None: eager)

    def __post_init__(self):
        # Resolve defaults now so that buffers and students compare equal field by field.
        from ..networks import DEFAULT_NORMS, default_convnet_depth, parse_arch

        name, depth_from_name = parse_arch(self.arch)
        self.arch = name
        if self.norm is None:
            self.norm = DEFAULT_NORMS[name]
        if name == "convnet" and self.depth is None:
            self.depth = int(depth_from_name or default_convnet_depth(self.res))

    def build(self) -> nn.Module:
        from ..networks import build_network

        net = build_network(self.arch, num_classes=self.num_classes, channels=self.channels,
                            res=self.res, width=self.width, depth=self.depth, norm=self.norm)
        if self.compile_backend:
            net.compile(backend=self.compile_backend)
        return net

    def build_seeded(self, generator: torch.Generator) -> nn.Module:
        """A freshly initialised network whose init is a function of `generator` only.

        Network constructors initialise from the global RNG; we fork it (the
        caller's global state is restored afterwards) and seed the fork from the
        explicit generator, so the init is reproducible and resumable.
        """
        seed = draw_int(2**62, generator)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()


# --------------------------------------------------------------------------- interface


class Algorithm:
    """One distillation objective.

    Subclasses set `name` and the default learning rates for Z and c (SGD,
    momentum 0.5, as released) and implement `image_gradient`.
    """

    name = ""
    default_lr_latent = 1.0
    default_lr_class = 1.0
    # True when the loss is a sum of per-class terms, each a function of its own class's images
    # only: the loop may then render and differentiate class groups one after the other.
    per_class = False

    def image_gradient(self, images: torch.Tensor, labels: torch.Tensor, ctx: StepContext):
        """Return (loss: 0-d tensor, dL/dimages: tensor like `images`).

        The loss stays a tensor (no host sync inside the algorithm; the planner runs
        this under fake tensors); the loop reads it once per iteration."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """Learnable parameters of the algorithm itself (optimised by the loop)."""
        return []

    def after_step(self) -> None:
        """Called after the loop's optimiser step (e.g. to keep a parameter in range)."""

    def to(self, device) -> "Algorithm":
        return self


def _on_device(module: nn.Module, device) -> nn.Module:
    """Move only when needed (a no-op `.to` still swaps every parameter)."""
    device = torch.device(device)
    if all(p.device == device for p in module.parameters()):
        return module
    return module.to(device)


def check_micro_batch(network: "NetworkSpec", micro_batch: int | None) -> int | None:
    """Micro-batching is exact only when no layer mixes samples (no batch norm)."""
    if micro_batch is None:
        return None
    if int(micro_batch) < 1:
        raise LD3MError(f"--micro-batch must be >= 1, got {micro_batch}")
    if network.norm == "batch":
        raise LD3MError("--micro-batch with norm 'batch' would change the result (batch statistics "
                        "mix samples); use the default instance norm or drop --micro-batch")
    return int(micro_batch)


# --------------------------------------------------------------------------- DM


class DM(Algorithm):
    """Distribution matching: per class, match the mean embedding of real and
    synthetic images under a random frozen ConvNet drawn each iteration.

        L = sum_k || mean_i embed(aug(real_k,i)) - mean_j embed(aug(syn_k,j)) ||^2

    The math is `ld3m_fast.losses.dm_loss`; this object draws the network and, class by
    class, the real batch and the class's augmentation (the released order: one Siamese
    draw per class). The network runs once over all classes' real images (without a
    graph, in forwards of at most `losses.REAL_FORWARD_BYTES` of input) and once over all
    synthetic images. Micro-batched and exact: with `micro_batch`, both sides run in
    micro-batches and the synthetic side's backward recomputes one micro-batch at a time.
    """

    name = "dm"
    per_class = True
    default_lr_latent = 1.0
    default_lr_class = 1.0

    def __init__(self, network: NetworkSpec, batch_real: int = 256, micro_batch: int | None = None):
        self.network = network
        self.batch_real = int(batch_real)
        self.micro_batch = check_micro_batch(network, micro_batch)

    def image_gradient(self, images, labels, ctx):
        net = _student(self.network, ctx, images.dtype)
        net.requires_grad_(False)  # frozen: only the images receive gradients
        groups, real_blocks, draws = _draw_classes(self.batch_real, labels, ctx, images.dtype)
        x = images.detach().requires_grad_(True)
        terms = dm_loss_from_blocks(net, x, groups, real_blocks, draws, dsa=ctx.dsa, micro_batch=self.micro_batch,
                                    real_batch=default_real_batch(x, self.micro_batch), per_class=True)
        (grad,) = torch.autograd.grad(terms.sum(), x)
        return _class_total(terms.detach(), [cls for cls, _ in groups], ctx), grad


def _class_total(terms: torch.Tensor, classes: list[int], ctx: StepContext) -> torch.Tensor:
    """The loss of every rank's classes from this rank's per-class `terms` (K_here,): placed in a
    vector over all classes (zeros for the other ranks' classes), summed over the ranks (exact:
    each entry has one non-zero term) and then over the classes in one fixed order, so the
    logged loss has the same bits on any number of processes (0-d)."""
    every = terms.new_zeros(ctx.real.num_classes)
    every[torch.tensor(classes, device=terms.device)] = terms
    return ctx.comm.all_reduce_(every).sum()


def _student(spec: NetworkSpec, ctx: StepContext, dtype: torch.dtype) -> nn.Module:
    """The iteration's freshly drawn network (the same on every rank), on the context's
    device, in `_work_dtype`."""
    net = _on_device(spec.build_seeded(ctx.stream("network")), ctx.device)
    return net.double() if _work_dtype(dtype) == torch.float64 else net


def _work_dtype(images_dtype: torch.dtype) -> torch.dtype:
    """Network and real images: float64 when the synthetic images are (exactness checks),
    otherwise float32 (autocast handles lower precision)."""
    return torch.float64 if images_dtype == torch.float64 else torch.float32


def _draw_classes(batch_real: int, labels: torch.Tensor, ctx: StepContext, dtype: torch.dtype):
    """Per class present in `labels`, in class order: its real batch, then its DSA draw.

    The order of the released loop (and of every earlier version of this one), so the
    sequential generators are consumed exactly as before: ctx.generator for the real
    batches, ctx.dsa_generator for one Siamese draw per class of max(n_real, n_syn) rows
    (with a seed: the streams ("real", class) and ("dsa", class)).
    The real batches are returned as loaders (`losses.RealBlock`): the images are
    decoded only when the network reaches them, one forward's worth at a time.
    """
    groups = class_groups(labels)
    real_blocks, draws = [], []
    for cls, index in groups:
        real_index = ctx.real.draw(cls, batch_real, ctx.stream("real", cls))
        real_blocks.append(RealBlock(len(real_index), partial(ctx.real.load, real_index, ctx.device,
                                                              _work_dtype(dtype))))
        draws.append(draw_for_class(ctx.dsa, _dsa_stream(ctx, cls), len(real_index), index.numel(), ctx.device))
    return groups, real_blocks, draws


def _dsa_stream(ctx: StepContext, key):
    """The DSA generator for `key` (None when there is no augmentation: nothing is drawn)."""
    return None if ctx.dsa is None else ctx.stream("dsa", key)


# --------------------------------------------------------------------------- DC


class DC(Algorithm):
    """Gradient matching: per class, match the per-layer gradients of the CE loss on
    real and synthetic images of a freshly drawn ConvNet (one outer step per iteration).

    The released DC also trains the network on the synthetic set between outer
    loops; here each iteration draws a fresh network, which keeps every
    iteration independent (and resumable) and matches DC's first outer step.

    The math is `ld3m_fast.losses.dc_loss` (per class `dc_class_term`); the image
    gradient is taken class by class, so memory does not grow with the class count.
    Micro-batched and exact: both parameter gradients are sums over micro-batches; the
    synthetic side's backward recomputes one micro-batch at a time (v = dL/dg_syn, then
    d(g_part . v)/dimages).
    """

    name = "dc"
    per_class = True
    default_lr_latent = 0.1
    default_lr_class = 0.1

    def __init__(self, network: NetworkSpec, batch_real: int = 256, micro_batch: int | None = None):
        self.network = network
        self.batch_real = int(batch_real)
        self.micro_batch = check_micro_batch(network, micro_batch)

    def image_gradient(self, images, labels, ctx):
        net = _student(self.network, ctx, images.dtype)
        params = [p for p in net.parameters() if p.requires_grad]
        grad = torch.zeros_like(images)
        groups = class_groups(labels)
        terms = []
        for cls, index in groups:
            real = ctx.real.load(ctx.real.draw(cls, self.batch_real, ctx.stream("real", cls)), ctx.device,
                                 _work_dtype(images.dtype))
            draw = draw_for_class(ctx.dsa, _dsa_stream(ctx, cls), real.shape[0], index.numel(), real.device)
            x = images[index.to(images.device)].detach().requires_grad_(True)
            term = dc_class_term(net, params, augment(ctx.dsa, real, draw), augment(ctx.dsa, x, draw), cls,
                                 self.micro_batch)
            (grad[index],) = torch.autograd.grad(term, x)
            terms.append(term.detach())
        return _class_total(torch.stack(terms), [cls for cls, _ in groups], ctx), grad


# --------------------------------------------------------------------------- MTT


class FlatStudent(FlatNetwork):
    """The student network at a flat parameter vector (`losses.FlatNetwork`) in the expert
    buffer's parameter order, checked against the buffer's names and shapes.

    theta: (P,) float, the parameters in `names` order, concatenated.
    """

    def __init__(self, module: nn.Module, names: list[str], shapes: list[tuple[int, ...]]):
        own = dict(module.named_parameters())
        missing = [n for n in names if n not in own]
        extra = [n for n in own if n not in names]
        wrong = [n for n, s in zip(names, shapes) if n in own and tuple(own[n].shape) != tuple(s)]
        if missing or extra or wrong:
            raise LD3MError(
                "expert buffer parameters do not fit the student network "
                f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]}); "
                "rebuild the buffer with the student's architecture")
        super().__init__(module, names, shapes)


class MTT(Algorithm):
    """Matching training trajectories.

    The student starts at expert epoch s (s uniform in [0, max_start_epoch)),
    takes `syn_steps` SGD steps on the (augmented) synthetic images with a
    learnable learning rate alpha, and is compared with expert epoch s + M:

        L = ||theta_N - theta*_{s+M}||^2 / ||theta*_s - theta*_{s+M}||^2

    gradient="truncated" (default, the released TESLA-style form): every theta_i
    is detached, so with G = sum_i g_i, r = theta_s - alpha G - theta*_{s+M},
    D = ||theta_s - theta*_{s+M}||^2 and v = -2 alpha r / D, the image gradient
    is sum_i VJP(g_i, v), computed one step at a time (memory constant in N);
    dL/dalpha = -2 G.r / D is exact.
    gradient="full": exact autograd through all N unrolled steps
    (create_graph; memory grows with N).

    The student lr alpha is stored as a plain parameter (optimised with the
    released SGD lr 1e-6) and clamped to >= `min_student_lr` after every step,
    which keeps it positive without changing the released dynamics elsewhere.

    `micro_batch` splits each student step into micro-batches (exact: the
    ConvNet's per-sample norm makes samples independent); None = whole batch.

    `image_grad_scale` multiplies the image gradient (not the loss, not dL/dalpha):
    0.5 under --released-compat, whose script applies its truncated image gradient
    at half its stated size (`2 * tuple` repeats the tuple; docs/released_compat.md).

    Distributed: each student step's batch is split by owner (`ctx.rows`); every rank
    computes its images' part of the step's parameter gradient (divided by the whole
    batch size) and the parts are all-reduced, so every rank walks the same trajectory
    and gets the same loss and dL/dalpha; each rank's image gradient is its own rows'.
    """

    name = "mtt"
    # The released lr 1000 (SPEC §2.4) acts on an image gradient it applies at half size
    # (`2 * tuple`): the same updates as 500 on the full gradient, 1000 on the half one.
    RELEASED_LR = 1000.0
    RELEASED_IMAGE_GRAD_SCALE = 0.5

    @property
    def default_lr_latent(self) -> float:
        return self.RELEASED_LR * self.RELEASED_IMAGE_GRAD_SCALE / self.image_grad_scale

    default_lr_class = default_lr_latent

    def __init__(self, network: NetworkSpec, trajectories, *, syn_steps: int = 10,
                 expert_epochs: int = 2, max_start_epoch: int = 2, student_lr: float = 0.01,
                 gradient: str = "truncated", batch_syn: int | None = None,
                 micro_batch: int | None = None, min_student_lr: float = 1e-8,
                 image_grad_scale: float = 1.0):
        if gradient not in MTT_GRADIENTS:
            raise LD3MError(f"unknown MTT gradient {gradient!r}; choose one of {', '.join(MTT_GRADIENTS)}")
        if syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 1:
            raise LD3MError("--syn-steps, --expert-epochs and --max-start-epoch must be >= 1")
        if not trajectories:
            raise LD3MError("the expert buffer holds no trajectories")
        needed = max_start_epoch - 1 + expert_epochs
        for t in trajectories:
            if t.num_snapshots <= needed:
                raise LD3MError(
                    f"expert trajectory {t.source} has epochs 0..{t.num_snapshots - 1} but MTT needs "
                    f"epoch {needed} (max_start_epoch {max_start_epoch} - 1 + expert_epochs "
                    f"{expert_epochs}); rebuild the buffer with more epochs")
        self.network = network
        self.trajectories = list(trajectories)
        first = self.trajectories[0]
        self.student = FlatStudent(network.build(), first.names, first.shapes)
        self.syn_steps = int(syn_steps)
        self.expert_epochs = int(expert_epochs)
        self.max_start_epoch = int(max_start_epoch)
        self.gradient = gradient
        self.batch_syn = batch_syn
        self.micro_batch = check_micro_batch(network, micro_batch)
        self.min_student_lr = float(min_student_lr)
        self.image_grad_scale = float(image_grad_scale)
        self.student_lr = nn.Parameter(torch.tensor(float(student_lr)))
        self.device = torch.device("cpu")

    def parameters(self):
        return [self.student_lr]

    def to(self, device):
        self.device = torch.device(device)
        self.student.module.to(self.device)
        with torch.no_grad():
            self.student_lr.data = self.student_lr.data.to(self.device)
        return self

    def after_step(self):
        with torch.no_grad():
            self.student_lr.clamp_(min=self.min_student_lr)

    # -- the pieces shared by both gradient forms

    def draw_expert(self, generator: torch.Generator):
        """(start, target) flat parameter vectors (P,) of a random expert segment."""
        which = draw_int(len(self.trajectories), generator)
        start_epoch = draw_int(self.max_start_epoch, generator)
        trajectory = self.trajectories[which]
        start = trajectory.snapshot(start_epoch).to(self.device)
        target = trajectory.snapshot(start_epoch + self.expert_epochs).to(self.device)
        return start, target

    def draw_steps(self, count: int, ctx: StepContext):
        """Per student step of the whole set of `count` images: (indices of the step's
        batch, DSA draw or None). The batch subset (when `batch_syn` < count) and the DSA
        draw come from the streams ("batch", step) and ("dsa", step)."""
        plan = []
        batch = count if self.batch_syn is None else min(int(self.batch_syn), count)
        with host_values():  # indices are host bookkeeping (real even while the planner fakes tensors)
            for step in range(self.syn_steps):
                # One mtt_plan step per student step: its draws in the order mtt_plan makes them.
                plan += mtt_plan(count, 1, batch_syn=self.batch_syn, dsa=ctx.dsa,
                                 generator=ctx.stream("batch", step) if batch < count else None,
                                 dsa_generator=_dsa_stream(ctx, step), device=ctx.device)
        return plan

    @staticmethod
    def own_part(plan, rows: slice | None, device):
        """This rank's part of every step: (local indices, the draw's rows, the step's whole
        batch size), a step of `losses.mtt_loss_from_plan`; rows None: the plan itself."""
        if rows is None:
            return plan
        local = []
        with host_values():
            for index, draw in plan:
                index = index.cpu()
                mine = torch.nonzero((index >= rows.start) & (index < rows.stop)).flatten()
                part = None if draw is None else draw.select(mine)
                local.append(((index[mine] - rows.start).to(device), part, int(index.numel())))
        return local

    def image_gradient(self, images, labels, ctx):
        start, target = self.draw_expert(ctx.stream("expert"))
        plan = self.own_part(self.draw_steps(ctx.whole(images.shape[0]), ctx), ctx.rows, ctx.device)
        x = images.detach().requires_grad_(True)
        loss = mtt_loss_from_plan(self.student, x, labels, self.student_lr, start, target, plan, dsa=ctx.dsa,
                                  micro_batch=self.micro_batch, gradient=self.gradient, comm=ctx.comm)
        image_grad, lr_grad = torch.autograd.grad(loss, [x, self.student_lr])
        self._accumulate_lr_grad(lr_grad)
        if self.image_grad_scale != 1.0:
            image_grad = image_grad * self.image_grad_scale
        return loss.detach(), image_grad

    def _accumulate_lr_grad(self, value: torch.Tensor):
        value = value.detach().to(self.student_lr.dtype).reshape(())
        if self.student_lr.grad is None:
            self.student_lr.grad = value.clone()
        else:
            self.student_lr.grad += value


def build_algorithm(name: str, network: NetworkSpec, *, trajectories=None, batch_real: int = 256,
                    micro_batch: int | None = None, **mtt_options) -> Algorithm:
    """The algorithm object for `name` ("dm", "dc", "mtt"); `micro_batch` applies to all three."""
    if name == "dm":
        return DM(network, batch_real=batch_real, micro_batch=micro_batch)
    if name == "dc":
        return DC(network, batch_real=batch_real, micro_batch=micro_batch)
    if name == "mtt":
        if trajectories is None:
            raise LD3MError("MTT needs an expert buffer: pass --buffer PATH (build one with `ld3m-fast buffer`)")
        return MTT(network, trajectories, micro_batch=micro_batch, **mtt_options)
    raise LD3MError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


__all__ = ["DC", "DM", "MTT", "Algorithm", "FlatStudent", "NetworkSpec", "RealData", "StepContext",
           "build_algorithm", "check_micro_batch", "class_noise", "gradient_distance", "iteration_stream",
           "micro_batches", "stream_generator"]
