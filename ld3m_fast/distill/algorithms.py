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
from the explicit generators in the `StepContext`, never from the global RNG.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .._host import draw_int, host_values
from ..errors import LD3MError
from ..normalization import from_uint8

from .config import ALGORITHMS, MTT_GRADIENTS


# --------------------------------------------------------------------------- context


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one named random stream, independent of every other stream/seed pair."""
    digest = hashlib.sha256(f"ld3m-fast:{seed}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class RealData:
    """The real training images, indexed by class, sampled with an explicit generator.

    images: (N, 3, res, res) uint8 (kept as uint8: 4x less memory than float),
    labels: (N,) long in [0, num_classes).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        if images.dtype != torch.uint8:
            raise ValueError(f"real images must be uint8, got {images.dtype}")
        self.images = images
        self.labels = labels.long()
        self.num_classes = int(num_classes)
        self.class_indices = [torch.nonzero(self.labels == k).flatten() for k in range(self.num_classes)]

    def sample(self, cls: int, count: int, generator: torch.Generator, device) -> torch.Tensor:
        """`count` random images of class `cls` (without replacement when possible),
        as network input (count', 3, res, res) float32 on `device`; count' = min(count, available)."""
        pool = self.class_indices[cls]
        if len(pool) == 0:
            raise LD3MError(f"class {cls} has no real images")
        order = torch.randperm(len(pool), generator=generator)[: min(count, len(pool))]
        return from_uint8(self.images[pool[order]]).to(device)


@dataclass
class StepContext:
    """What an algorithm may use besides the synthetic images.

    `generator` drives network inits, real batches and expert choice;
    `dsa_generator` drives the augmentation draws. Both are CPU generators so
    that a run is reproducible across devices and resumable from saved states.
    """

    real: RealData | None
    generator: torch.Generator
    dsa: object | None = None
    dsa_generator: torch.Generator | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


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


def augment_pair(ctx: StepContext, real: torch.Tensor, syn: torch.Tensor):
    """DSA in Siamese mode: real and synthetic batches share one draw.

    Row i of both batches gets parameter set i of one draw (the released
    behaviour, which re-seeded the same generator before each of the two calls).
    """
    if ctx.dsa is None:
        return real, syn
    draw = ctx.dsa.draw(max(real.shape[0], syn.shape[0]), ctx.dsa_generator, real.device)
    return ctx.dsa.apply(real, draw), ctx.dsa.apply(syn, draw)


def augment(ctx: StepContext, images: torch.Tensor, draw=None):
    """Per-sample DSA on one batch (`draw` from `ctx.dsa.draw`, or None: no augmentation)."""
    if ctx.dsa is None or draw is None:
        return images
    return ctx.dsa.apply(images, draw)


# --------------------------------------------------------------------------- interface


class Algorithm:
    """One distillation objective.

    Subclasses set `name` and the default learning rates for Z and c (SGD,
    momentum 0.5, as released) and implement `image_gradient`.
    """

    name = ""
    default_lr_latent = 1.0
    default_lr_class = 1.0

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


def _vjp(output: torch.Tensor, leaf: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(output . grad)/d leaf; an augmentation that returned its input passes grad through."""
    if output is leaf:
        return grad
    (result,) = torch.autograd.grad(output, leaf, grad)
    return result


def micro_batches(count: int, size: int | None) -> list[slice]:
    """Slices covering range(count) in pieces of `size` (None: one piece)."""
    size = count if not size else int(size)
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


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


def _class_groups(labels: torch.Tensor):
    """[(class, index tensor)] for every class present in `labels`, in class order."""
    with host_values():  # labels are host bookkeeping (real even while the planner fakes tensors)
        return [(int(k), torch.nonzero(labels == k).flatten()) for k in torch.unique(labels).tolist()]


# --------------------------------------------------------------------------- DM


class DM(Algorithm):
    """Distribution matching: per class, match the mean embedding of real and
    synthetic images under a random frozen ConvNet drawn each iteration.

        L = sum_k || mean_i embed(aug(real_k,i)) - mean_j embed(aug(syn_k,j)) ||^2

    Micro-batched and exact (see `micro_batches`): the real mean accumulates over
    micro-batches without a graph; the synthetic side takes two passes, the mean
    first, then dL/d embed_j = -2 (real_mean - syn_mean) / n per micro-batch.
    """

    name = "dm"
    default_lr_latent = 1.0
    default_lr_class = 1.0

    def __init__(self, network: NetworkSpec, batch_real: int = 256, micro_batch: int | None = None):
        self.network = network
        self.batch_real = int(batch_real)
        self.micro_batch = check_micro_batch(network, micro_batch)

    def image_gradient(self, images, labels, ctx):
        net = _on_device(self.network.build_seeded(ctx.generator), ctx.device)
        net.requires_grad_(False)  # frozen: only the images receive gradients
        grad = torch.zeros_like(images)
        total = images.new_zeros(())
        # One class at a time: memory does not grow with the class count.
        for cls, index in _class_groups(labels):
            syn = images[index].detach().requires_grad_(True)
            real = ctx.real.sample(cls, self.batch_real, ctx.generator, ctx.device)
            real_aug, syn_aug = augment_pair(ctx, real, syn)
            with torch.no_grad():
                real_mean = _embedding_sum(net, real_aug, self.micro_batch) / real_aug.shape[0]
                syn_mean = _embedding_sum(net, syn_aug.detach(), self.micro_batch) / syn_aug.shape[0]
            residual = real_mean - syn_mean
            total = total + residual.pow(2).sum()
            row_grad = -2.0 * residual / syn_aug.shape[0]
            aug_grad = torch.zeros_like(syn_aug)
            for part in micro_batches(syn_aug.shape[0], self.micro_batch):
                x_part = syn_aug[part].detach().requires_grad_(True)
                embedding = net.embed(x_part)
                (aug_grad[part],) = torch.autograd.grad(embedding, x_part, row_grad.expand_as(embedding))
            grad[index] = _vjp(syn_aug, syn, aug_grad)
        return total, grad


def _embedding_sum(net, images, micro_batch):
    """sum_i embed(images_i), accumulated over micro-batches."""
    return sum(net.embed(images[part]).sum(0) for part in micro_batches(images.shape[0], micro_batch))


# --------------------------------------------------------------------------- DC


def gradient_distance(real_grads, syn_grads) -> torch.Tensor:
    """Sum over layers of sum over output rows of (1 - cosine), as in the released DC.

    Each gradient is viewed as (out_rows, -1); 1-D parameters (biases, norm
    scales) are skipped, as the released `distance_wb` does.
    """
    total = None
    for g_real, g_syn in zip(real_grads, syn_grads):
        if g_real is None or g_syn is None or g_real.dim() == 1:
            continue
        rows_real = g_real.reshape(g_real.shape[0], -1)
        rows_syn = g_syn.reshape(g_syn.shape[0], -1)
        cosine = (rows_real * rows_syn).sum(-1) / (rows_real.norm(dim=-1) * rows_syn.norm(dim=-1) + 1e-6)
        term = (1.0 - cosine).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no multi-dimensional parameter received a gradient")
    return total


class DC(Algorithm):
    """Gradient matching: per class, match the per-layer gradients of the CE loss on
    real and synthetic images of a freshly drawn ConvNet (one outer step per iteration).

    The released DC also trains the network on the synthetic set between outer
    loops; here each iteration draws a fresh network, which keeps every
    iteration independent (and resumable) and matches DC's first outer step.

    Micro-batched and exact: both parameter gradients are sums over micro-batches;
    the synthetic side takes two passes, g_syn first (no graph), then
    v = dL/dg_syn and, per micro-batch, d(g_part . v)/dimages.
    """

    name = "dc"
    default_lr_latent = 0.1
    default_lr_class = 0.1

    def __init__(self, network: NetworkSpec, batch_real: int = 256, micro_batch: int | None = None):
        self.network = network
        self.batch_real = int(batch_real)
        self.micro_batch = check_micro_batch(network, micro_batch)

    def _ce_gradient(self, net, params, x, cls, *, create_graph=False):
        """dCE/dparams of the batch mean, summed over micro-batches of `x`."""
        total = None
        for part in micro_batches(x.shape[0], self.micro_batch):
            logits = net(x[part])
            targets = torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device)
            loss = F.cross_entropy(logits, targets, reduction="sum") / x.shape[0]
            grads = torch.autograd.grad(loss, params, create_graph=create_graph)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
        return total

    def image_gradient(self, images, labels, ctx):
        net = _on_device(self.network.build_seeded(ctx.generator), ctx.device)
        params = [p for p in net.parameters() if p.requires_grad]
        grad = torch.zeros_like(images)
        total = images.new_zeros(())
        for cls, index in _class_groups(labels):
            syn = images[index].detach().requires_grad_(True)
            real = ctx.real.sample(cls, self.batch_real, ctx.generator, ctx.device)
            real_aug, syn_aug = augment_pair(ctx, real, syn)
            real_grads = [g.detach() for g in self._ce_gradient(net, params, real_aug, cls)]
            syn_grads = [g.detach().requires_grad_(True)
                         for g in self._ce_gradient(net, params, syn_aug.detach(), cls)]
            loss = gradient_distance(real_grads, syn_grads)
            v = torch.autograd.grad(loss, syn_grads, allow_unused=True)
            v = [torch.zeros_like(g) if vi is None else vi for g, vi in zip(syn_grads, v)]
            total = total + loss.detach()
            aug_grad = torch.zeros_like(syn_aug)
            for part in micro_batches(syn_aug.shape[0], self.micro_batch):
                x_part = syn_aug[part].detach().requires_grad_(True)
                logits = net(x_part)
                targets = torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device)
                part_loss = F.cross_entropy(logits, targets, reduction="sum") / syn_aug.shape[0]
                part_grads = torch.autograd.grad(part_loss, params, create_graph=True)
                (aug_grad[part],) = torch.autograd.grad(part_grads, x_part, v)
            grad[index] = _vjp(syn_aug, syn, aug_grad)
        return total, grad


# --------------------------------------------------------------------------- MTT


class FlatStudent:
    """A network evaluated with a flat parameter vector through `functional_call`.

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
        self.module = module
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, self.sizes)
        params = {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}
        return functional_call(self.module, params, (x,))


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
    """

    name = "mtt"
    default_lr_latent = 1000.0
    default_lr_class = 1000.0

    def __init__(self, network: NetworkSpec, trajectories, *, syn_steps: int = 10,
                 expert_epochs: int = 2, max_start_epoch: int = 2, student_lr: float = 0.01,
                 gradient: str = "truncated", batch_syn: int | None = None,
                 micro_batch: int | None = None, min_student_lr: float = 1e-8):
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
        """Per student step: (indices of the synthetic batch, DSA draw or None)."""
        plan = []
        batch = count if self.batch_syn is None else min(int(self.batch_syn), count)
        for _ in range(self.syn_steps):
            if batch == count:
                index = torch.arange(count)
            else:
                index = torch.randperm(count, generator=ctx.generator)[:batch]
            draw = None if ctx.dsa is None else ctx.dsa.draw(batch, ctx.dsa_generator, ctx.device)
            plan.append((index.to(ctx.device), draw))
        return plan

    def _step_gradient(self, theta, x_aug, targets, *, create_graph=False):
        """g = dCE/dtheta at `theta` (P,) for the augmented batch (whole batch mean)."""
        count = x_aug.shape[0]
        total = None
        for part in micro_batches(count, self.micro_batch):
            loss = F.cross_entropy(self.student(theta, x_aug[part]), targets[part], reduction="sum") / count
            (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
            total = g if total is None else total + g
        return total

    def image_gradient(self, images, labels, ctx):
        start, target = self.draw_expert(ctx.generator)
        plan = self.draw_steps(images.shape[0], ctx)
        if self.gradient == "truncated":
            return self._truncated(images, labels, ctx, start, target, plan)
        return self._full(images, labels, ctx, start, target, plan)

    def _truncated(self, images, labels, ctx, start, target, plan):
        from ..ops import mtt_truncated_terms

        images = images.detach()
        alpha = self.student_lr.detach()
        # Pass 1: the student's trajectory, no graph kept (each theta_i detached); only G is kept.
        grad_sum = torch.zeros_like(start)
        theta = start
        for index, draw in plan:
            theta = theta.detach().requires_grad_(True)
            with torch.no_grad():
                x_aug = augment(ctx, images[index], draw)
            g = self._step_gradient(theta, x_aug, labels[index])
            grad_sum += g
            theta = theta.detach() - alpha * g
        loss, v, dloss_dalpha = mtt_truncated_terms(start, grad_sum, target, alpha)
        # Pass 2: walk the trajectory again (same arithmetic, so the same theta_i) and take
        # d(g_i . v)/dimages step by step: one step's graph alive at a time and no stored
        # theta_i, so memory does not grow with the number of student steps.
        image_grad = torch.zeros_like(images)
        theta = start
        for index, draw in plan:
            theta = theta.detach().requires_grad_(True)
            x = images[index].requires_grad_(True)
            x_aug = augment(ctx, x, draw)
            aug_grad = torch.zeros_like(x_aug)
            count = x_aug.shape[0]
            targets = labels[index]
            g_value = None
            for part in micro_batches(count, self.micro_batch):
                x_part = x_aug[part].detach().requires_grad_(True)
                loss_part = F.cross_entropy(self.student(theta, x_part), targets[part],
                                            reduction="sum") / count
                (g_part,) = torch.autograd.grad(loss_part, theta, create_graph=True)
                (aug_grad[part],) = torch.autograd.grad(g_part, x_part, grad_outputs=v)
                g_value = g_part.detach() if g_value is None else g_value + g_part.detach()
            if x_aug.requires_grad:
                (step_grad,) = torch.autograd.grad(x_aug, x, grad_outputs=aug_grad)
            else:
                step_grad = aug_grad
            image_grad.index_add_(0, index, step_grad)
            theta = theta.detach() - alpha * g_value
        self._accumulate_lr_grad(dloss_dalpha)
        return loss.detach(), image_grad

    def _full(self, images, labels, ctx, start, target, plan):
        from ..ops import trajectory_matching_distance

        x = images.detach().requires_grad_(True)
        alpha = self.student_lr
        theta = start.clone().requires_grad_(True)
        for index, draw in plan:
            g = self._step_gradient(theta, augment(ctx, x[index], draw), labels[index], create_graph=True)
            theta = theta - alpha * g
        loss = trajectory_matching_distance(theta, start, target)
        image_grad, lr_grad = torch.autograd.grad(loss, [x, alpha])
        self._accumulate_lr_grad(lr_grad)
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
