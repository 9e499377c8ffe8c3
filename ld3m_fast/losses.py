"""Distillation losses as functions of plain tensors: DM, DC and MTT.

Each function takes the synthetic images (any float tensor that requires grad, in
whatever normalisation the caller feeds its network) and returns a 0-d loss;
`loss.backward()` (or `torch.autograd.grad(loss, images)`) gives dL/d images:

    dm_loss(syn, syn_labels, real, real_labels, network)          network.embed(x) -> (B, F)
    dc_loss(syn, syn_labels, real, real_labels, network)          network(x) -> logits
    mtt_loss(syn, syn_labels, network, start, target, student_lr)  start, target: (P,) flat

Shapes: syn (N, C, H, W) float, syn_labels (N,) long; real (M, C, H, W) float of the same
dtype, real_labels (M,) long. DM and DC work class by class over the classes present in
`syn_labels` (in ascending order); each needs real images of every such class.

Augmentation (optional): `dsa` (an `ld3m_fast.dsa.DSA`) and `dsa_generator`. DM and DC
draw one augmentation per class and call, shared by that class's real and synthetic
images (Siamese: row i of both gets parameter set i of a draw for max(n_real, n_syn)
rows), as the released DSA does; MTT draws one per student step.

Micro-batching (optional, `micro_batch`): exact with per-sample norm (the ConvNet's
instance norm), since no layer mixes samples. DM and DC then keep one micro-batch's graph
at a time: the forward runs without a graph and backward recomputes each micro-batch
(the network's parameters receive no gradient then; DM and DC networks are frozen).

These functions are the one copy of the math: `ld3m_fast.distill.algorithms` (the loop's
DM, DC and MTT objects) draws networks, real batches and experts and calls the pieces
below. The plain released-style definitions are in `ld3m_fast.reference.distill_losses`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ._host import host_values
from .choices import MTT_GRADIENTS
from .errors import LD3MError

# The real images of all classes go through the DM network together, in forwards of at most
# this many bytes of input: 341 images of 3x32x32 float32 (the embedded default's 640 in two
# forwards), 21 at 128², 5 at 256². A ConvNet's first activation is ~43x its input (~170 MiB),
# so memory stays bounded whatever the class count. Measured (one thread, 640 images at 32²):
# forwards of 320 images take 701 ms, one of 640 701 ms, ten of 64 740 ms.
REAL_FORWARD_BYTES = 4 * 2**20


# --------------------------------------------------------------------------- shared pieces


def micro_batches(count: int, size: int | None) -> list[slice]:
    """Slices covering range(count) in pieces of `size` (None: one piece)."""
    size = count if not size else int(size)
    return [slice(i, min(i + size, count)) for i in range(0, max(count, 1), max(size, 1))]


def class_groups(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(class, index tensor)] for every class present in `labels`, in ascending class order."""
    with host_values():  # labels are host bookkeeping (real even while the planner fakes tensors)
        labels = labels.cpu()
        return [(int(k), torch.nonzero(labels == k).flatten()) for k in torch.unique(labels).tolist()]


def _to(index: torch.Tensor, device) -> torch.Tensor:
    return index if index.device == torch.device(device) else index.to(device)


def augment(dsa, images: torch.Tensor, draw) -> torch.Tensor:
    """`dsa.apply(images, draw)` in the contiguous layout, or `images` itself without augmentation.

    The layout matters for exactness: crop returns a channels-last tensor, the other groups keep
    their input's, and `torch.cat` of mixed layouts gives a contiguous one, so a batch of several
    classes would otherwise reach the network in a layout that depends on which other classes it
    holds (a convolution gives other bits in another layout), i.e. on the number of processes."""
    if dsa is None or draw is None:
        return images
    return dsa.apply(images, draw).contiguous()


def draw_for_class(dsa, dsa_generator, real_count: int, syn_count: int, device):
    """One Siamese draw for a class: parameters for max(real_count, syn_count) rows (None: no DSA)."""
    if dsa is None:
        return None
    if dsa_generator is None:
        raise LD3MError("augmentation needs an explicit dsa_generator (a torch.Generator)")
    return dsa.draw(max(real_count, syn_count), dsa_generator, device)


def _real_blocks(real_images, real_labels, groups):
    """The real images of each class in `groups`, as a list of (n_k, C, H, W) tensors."""
    with host_values():
        labels = real_labels.cpu()
        indices = [torch.nonzero(labels == k).flatten() for k, _ in groups]
    missing = [k for (k, _), index in zip(groups, indices) if index.numel() == 0]
    if missing:
        raise LD3MError(f"no real images of class {missing[0]} (the synthetic set has that class)")
    return [real_images[_to(index, real_images.device)] for index in indices]


def _check_images(syn_images, real_images=None):
    if not torch.is_floating_point(syn_images):
        raise LD3MError(f"synthetic images must be a float tensor, got {syn_images.dtype}")
    if syn_images.dim() != 4:
        raise LD3MError(f"synthetic images must be (N, C, H, W), got shape {tuple(syn_images.shape)}")
    if real_images is not None and (not torch.is_floating_point(real_images) or real_images.dim() != 4):
        raise LD3MError(f"real images must be a float (M, C, H, W) tensor, got {real_images.dtype} "
                        f"{tuple(real_images.shape)}; convert uint8 images first "
                        "(e.g. ld3m_fast.normalization.from_uint8)")


# --------------------------------------------------------------------------- DM


def _segments(counts: list[int], device) -> torch.Tensor:
    """(sum counts,) long: row -> its class block (blocks are contiguous, in order)."""
    return torch.cat([torch.full((n,), k, dtype=torch.long, device=device) for k, n in enumerate(counts)])


def _embedding_sums(network, images, segment, num_groups, batch):
    """(K, F) per-block sums of network.embed over `images`, forwarded in pieces of `batch`."""
    total = None
    for part in micro_batches(images.shape[0], batch):
        embedding = network.embed(images[part])
        sums = embedding.new_zeros(num_groups, embedding.shape[1]).index_add(0, segment[part], embedding)
        total = sums if total is None else total + sums
    return total


class _RecomputedClassMeans(torch.autograd.Function):
    """Per-class mean embeddings whose backward recomputes one micro-batch at a time.

    forward: no graph kept; backward: dL/d row j = dL/d mean_k(j) / n_k(j), pushed through
    network.embed micro-batch by micro-batch (the two-pass exact micro-batching of DM).
    """

    @staticmethod
    def forward(ctx, images, network, segment, counts, batch):
        ctx.save_for_backward(images, segment, counts)
        ctx.network, ctx.batch = network, batch
        return _embedding_sums(network, images, segment, counts.shape[0], batch) / counts[:, None]

    @staticmethod
    def backward(ctx, grad_means):
        images, segment, counts = ctx.saved_tensors
        row_grad = (grad_means / counts[:, None])[segment]
        grad = torch.empty_like(images)
        with torch.enable_grad():
            for part in micro_batches(images.shape[0], ctx.batch):
                x = images[part].detach().requires_grad_(True)
                (grad[part],) = torch.autograd.grad(ctx.network.embed(x), x, row_grad[part])
        return grad, None, None, None, None


def class_mean_embeddings(network, images, counts: list[int], micro_batch: int | None = None):
    """(K, F) mean of network.embed over each of K contiguous row blocks of sizes `counts`.

    With autograd on and `micro_batch` smaller than the batch, the graph is not kept:
    backward recomputes micro-batch by micro-batch (image gradients only: the network
    must be frozen). Otherwise one differentiable pass in pieces of `micro_batch`.
    """
    segment = _segments(counts, images.device)
    sizes = torch.tensor(counts, dtype=images.dtype, device=images.device)
    recompute = (torch.is_grad_enabled() and images.requires_grad and micro_batch is not None
                 and micro_batch < images.shape[0])
    if recompute:
        if any(p.requires_grad for p in network.parameters()):
            raise LD3MError("micro-batched DM needs a frozen network: call network.requires_grad_(False)")
        return _RecomputedClassMeans.apply(images, network, segment, sizes, micro_batch)
    return _embedding_sums(network, images, segment, len(counts), micro_batch) / sizes[:, None]


def dm_distance(real_means: torch.Tensor, syn_means: torch.Tensor) -> torch.Tensor:
    """sum_k ||real_mean_k - syn_mean_k||^2 over (K, F) class means."""
    return (real_means - syn_means).pow(2).sum()


def dm_class_distances(real_means: torch.Tensor, syn_means: torch.Tensor) -> torch.Tensor:
    """(K,) ||real_mean_k - syn_mean_k||^2 per class: `dm_distance` before the sum over classes
    (its gradient has the same bits: the sums' backward only spreads ones)."""
    return (real_means - syn_means).pow(2).sum(dim=1)


class RealBlock(NamedTuple):
    """One class's real images, loaded when the network reaches them: `count` rows, `load()`
    returns them as a (count, C, H, W) float tensor."""

    count: int
    load: Callable[[], torch.Tensor]


def real_class_means(network, blocks, draws, *, dsa=None, batch: int | None = None) -> torch.Tensor:
    """(K, F) mean embeddings of K classes' real images, without a graph.

    blocks[k]: class k's real images (a tensor or a `RealBlock`); draws[k]: its DSA draw.
    The classes are augmented one by one and streamed through the network in forwards of
    at most `batch` images (None: all at once) holding whole classes; a class of more than
    `batch` images goes alone, in pieces of `batch` counted from its first image. So a
    class's sum is added up in the same pieces whichever classes come before it (a process
    holding only some of the classes gets the same sums), and memory holds one forward's
    worth of images, whatever the class count.
    """
    counts = [b.count if isinstance(b, RealBlock) else b.shape[0] for b in blocks]
    state = {"total": None}
    pending, pending_rows = [], 0

    def forward(pieces):
        classes = torch.cat([torch.full((x.shape[0],), k, dtype=torch.long, device=x.device) for k, x in pieces])
        embedding = network.embed(pieces[0][1] if len(pieces) == 1 else torch.cat([x for _, x in pieces]))
        sums = embedding.new_zeros(len(blocks), embedding.shape[1]).index_add(0, classes, embedding)
        state["total"] = sums if state["total"] is None else state["total"] + sums

    with torch.no_grad():
        for k, (block, draw) in enumerate(zip(blocks, draws)):
            if pending and batch is not None and pending_rows + counts[k] > batch:
                forward(pending)
                pending, pending_rows = [], 0
            images = block.load() if isinstance(block, RealBlock) else block
            augmented = augment(dsa, images, draw)
            if batch is not None and augmented.shape[0] > batch:
                for part in micro_batches(augmented.shape[0], batch):
                    forward([(k, augmented[part])])
                continue
            pending.append((k, augmented))
            pending_rows += augmented.shape[0]
        if pending:
            forward(pending)
        total = state["total"]
        sizes = torch.tensor(counts, dtype=total.dtype, device=total.device)
        return total / sizes[:, None]


def dm_loss_from_blocks(network, syn_images, groups, real_blocks, draws, *, dsa=None,
                        micro_batch: int | None = None, real_batch: int | None = None,
                        per_class: bool = False) -> torch.Tensor:
    """DM on prepared per-class inputs (the piece `dm_loss` and the DM object share).

    groups: [(class, index into syn_images)]; real_blocks[k]: class k's real images (a
    tensor or a `RealBlock`); draws[k]: its DSA draw (or None). Real embeddings: no graph,
    all classes streamed together in forwards of `real_batch` images (`real_class_means`);
    synthetic embeddings: one differentiable forward for all classes (or micro-batches,
    see `class_mean_embeddings`). Returns the 0-d loss, or with `per_class` its (K,) terms.
    """
    real_means = real_class_means(network, real_blocks, draws, dsa=dsa, batch=real_batch)
    syn = torch.cat([augment(dsa, syn_images[_to(index, syn_images.device)], draw)
                     for (_, index), draw in zip(groups, draws)])
    syn_means = class_mean_embeddings(network, syn, [index.numel() for _, index in groups], micro_batch)
    return (dm_class_distances if per_class else dm_distance)(real_means, syn_means)


def default_real_batch(images: torch.Tensor, micro_batch: int | None = None) -> int:
    """Real images per DM forward: `REAL_FORWARD_BYTES` of input (sized from one image of
    `images`, which have the real images' shape and dtype), capped by `micro_batch`."""
    per_image = images[0].numel() * images.element_size() if images.shape[0] else 1
    size = max(1, REAL_FORWARD_BYTES // max(per_image, 1))
    return size if micro_batch is None else min(size, int(micro_batch))


def dm_loss(syn_images: torch.Tensor, syn_labels: torch.Tensor, real_images: torch.Tensor,
            real_labels: torch.Tensor, network: nn.Module, *, dsa=None,
            dsa_generator: torch.Generator | None = None, micro_batch: int | None = None) -> torch.Tensor:
    """Distribution matching (Zhao & Bilen 2023), the loss of LD3M's DM:

        L = sum_k || mean_{i in real_k} embed(aug(x_i)) - mean_{j in syn_k} embed(aug(s_j)) ||^2

    network: an nn.Module with `embed(x) -> (B, F)`; frozen (requires_grad False) when
        `micro_batch` is set. Real embeddings are computed without a graph.
    Returns a 0-d tensor; autograd gives dL/d syn_images.
    """
    _check_images(syn_images, real_images)
    groups = class_groups(syn_labels)
    blocks = _real_blocks(real_images, real_labels, groups)
    draws = [draw_for_class(dsa, dsa_generator, block.shape[0], index.numel(), syn_images.device)
             for block, (_, index) in zip(blocks, groups)]
    return dm_loss_from_blocks(network, syn_images, groups, blocks, draws, dsa=dsa, micro_batch=micro_batch,
                               real_batch=default_real_batch(real_images, micro_batch))


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


def class_gradient(network, params, images, cls: int, micro_batch: int | None = None, *,
                   create_graph: bool = False):
    """dCE/dparams of the batch mean (target `cls` for every row), summed over micro-batches."""
    total = None
    for part in micro_batches(images.shape[0], micro_batch):
        logits = network(images[part])
        targets = torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, targets, reduction="sum") / images.shape[0]
        grads = torch.autograd.grad(loss, params, create_graph=create_graph)
        total = list(grads) if total is None else [a + b for a, b in zip(total, grads)]
    return total


class _RecomputedClassGradient(torch.autograd.Function):
    """`class_gradient` of the synthetic images whose backward recomputes one micro-batch
    at a time: for v = dL/dg, dL/dx_part = d(g_part . v)/dx_part (DC's exact two passes)."""

    @staticmethod
    def forward(ctx, images, network, params, cls, batch):
        ctx.save_for_backward(images)
        ctx.network, ctx.params, ctx.cls, ctx.batch = network, params, cls, batch
        with torch.enable_grad():
            grads = class_gradient(network, params, images, cls, batch)
        return tuple(g.detach() for g in grads)

    @staticmethod
    def backward(ctx, *v):
        (images,) = ctx.saved_tensors
        params = ctx.params
        v = [torch.zeros_like(p) if vi is None else vi for p, vi in zip(params, v)]
        grad = torch.empty_like(images)
        with torch.enable_grad():
            for part in micro_batches(images.shape[0], ctx.batch):
                x = images[part].detach().requires_grad_(True)
                logits = ctx.network(x)
                targets = torch.full((logits.shape[0],), ctx.cls, dtype=torch.long, device=logits.device)
                loss = F.cross_entropy(logits, targets, reduction="sum") / images.shape[0]
                g_part = torch.autograd.grad(loss, params, create_graph=True)
                (grad[part],) = torch.autograd.grad(g_part, x, v, allow_unused=True, materialize_grads=True)
        return grad, None, None, None, None


def dc_class_term(network, params, real_aug, syn_aug, cls: int, micro_batch: int | None = None):
    """One class's DC term: gradient_distance(dCE/dparams on real, on synthetic).

    The real gradient carries no graph; the synthetic one is differentiable in `syn_aug`
    (with `micro_batch` smaller than the batch: recomputed per micro-batch in backward).
    """
    g_real = [g.detach() for g in class_gradient(network, params, real_aug, cls, micro_batch)]
    if syn_aug.requires_grad and micro_batch is not None and micro_batch < syn_aug.shape[0]:
        g_syn = _RecomputedClassGradient.apply(syn_aug, network, params, cls, micro_batch)
    else:
        g_syn = class_gradient(network, params, syn_aug, cls, micro_batch, create_graph=syn_aug.requires_grad)
    return gradient_distance(g_real, g_syn)


def dc_loss(syn_images: torch.Tensor, syn_labels: torch.Tensor, real_images: torch.Tensor,
            real_labels: torch.Tensor, network: nn.Module, *, dsa=None,
            dsa_generator: torch.Generator | None = None, micro_batch: int | None = None) -> torch.Tensor:
    """Gradient matching (Zhao et al. 2021), one outer step, the loss of LD3M's DC:

        L = sum_k D(dCE(real_k, k)/dtheta, dCE(syn_k, k)/dtheta)     D = `gradient_distance`

    network: any nn.Module mapping images to logits (class k is target k); theta are its
    parameters that require grad. Returns a 0-d tensor; autograd gives dL/d syn_images
    (second derivatives through the network).
    """
    _check_images(syn_images, real_images)
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise LD3MError("dc_loss matches parameter gradients: the network has no parameter that requires grad")
    groups = class_groups(syn_labels)
    blocks = _real_blocks(real_images, real_labels, groups)
    total = None
    for (cls, index), block in zip(groups, blocks):
        draw = draw_for_class(dsa, dsa_generator, block.shape[0], index.numel(), syn_images.device)
        real_aug = augment(dsa, block, draw)
        syn_aug = augment(dsa, syn_images[_to(index, syn_images.device)], draw)
        term = dc_class_term(network, params, real_aug, syn_aug, cls, micro_batch)
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------- MTT


class FlatNetwork:
    """A module evaluated at a flat parameter vector through `functional_call`.

    theta: (P,) float, the parameters in `names` order (default: the module's
    `named_parameters()` order), concatenated. `flat_network(theta, x) -> module(x)`.
    """

    def __init__(self, module: nn.Module, names=None, shapes=None):
        own = list(module.named_parameters())
        self.module = module
        self.names = [n for n, _ in own] if names is None else list(names)
        self.shapes = [tuple(p.shape) for _, p in own] if shapes is None else [tuple(s) for s in shapes]
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]

    def flatten(self) -> torch.Tensor:
        """The module's own parameters as one (P,) vector."""
        own = dict(self.module.named_parameters())
        return torch.cat([own[n].detach().reshape(-1) for n in self.names])

    def __call__(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, self.sizes)
        params = {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}
        return functional_call(self.module, params, (x,))


def mtt_plan(count: int, syn_steps: int, *, batch_syn: int | None = None, dsa=None,
             generator: torch.Generator | None = None, dsa_generator: torch.Generator | None = None,
             device=None):
    """Per student step: (indices into the synthetic batch, DSA draw or None).

    The whole batch every step unless `batch_syn` < count (then a random subset drawn
    from `generator`); one DSA draw per step from `dsa_generator`.

    A step may also be (indices, draw, batch): one process's part of a step whose whole
    batch has `batch` images on all processes together (`mtt_loss_from_plan` with `comm`).
    """
    plan = []
    batch = count if batch_syn is None else min(int(batch_syn), count)
    for _ in range(int(syn_steps)):
        if batch == count:
            index = torch.arange(count)
        else:
            if generator is None:
                raise LD3MError("batch_syn smaller than the synthetic set needs an explicit generator")
            index = torch.randperm(count, generator=generator)[:batch]
        draw = None
        if dsa is not None:
            if dsa_generator is None:
                raise LD3MError("augmentation needs an explicit dsa_generator (a torch.Generator)")
            draw = dsa.draw(batch, dsa_generator, device)
        plan.append((index if device is None else index.to(device), draw))
    return plan


def _step_parts(step):
    """(indices, draw, whole batch size) of a plan step: (index, draw) or (index, draw, batch)."""
    index, draw, *batch = step
    return index, draw, (batch[0] if batch else index.numel())


def student_gradient_parts(student, theta, x_aug, targets, micro_batch: int | None = None, *,
                           create_graph: bool = False, count: int | None = None) -> list[torch.Tensor]:
    """[dCE/dtheta of each micro-batch of `x_aug`] at `theta` (P,), each divided by `count`
    (default: x_aug's batch size; a process holding part of a batch divides by the whole
    batch's). Their sum, in this order, is the batch mean's gradient (`student_gradient`)."""
    count = x_aug.shape[0] if count is None else int(count)
    parts = []
    for part in micro_batches(x_aug.shape[0], micro_batch) if x_aug.shape[0] else ():
        loss = F.cross_entropy(student(theta, x_aug[part]), targets[part], reduction="sum") / count
        parts.append(torch.autograd.grad(loss, theta, create_graph=create_graph)[0])
    return parts


def add_in_order(parts: list[torch.Tensor], start: torch.Tensor | None = None) -> torch.Tensor | None:
    """((start + parts[0]) + parts[1]) + ...: one fixed order of addition (None: nothing to add)."""
    total = start
    for part in parts:
        total = part if total is None else total + part
    return total


def student_gradient(student, theta, x_aug, targets, micro_batch: int | None = None, *,
                     create_graph: bool = False, count: int | None = None) -> torch.Tensor:
    """g = dCE/dtheta at `theta` (P,) of the batch mean, summed over micro-batches in order.

    count: the batch size the mean divides by (default: x_aug's; a process holding part of
    a batch divides by the whole batch's, and the parts are summed across processes)."""
    total = add_in_order(student_gradient_parts(student, theta, x_aug, targets, micro_batch,
                                                create_graph=create_graph, count=count))
    if total is None:  # none of this step's images on this process
        return theta * 0.0 if create_graph else torch.zeros_like(theta)
    return total


def _sum_in_order(comm, parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The step's gradient from this process's micro-batch parts: every process's parts added in
    one order, process by process (`comm.chain_sum`), which is the order one process adds the
    same micro-batches in; with one process, their plain sum."""
    if comm is None:
        from .distributed import Single

        comm = Single()
    return comm.chain_sum(parts, like)


class _TruncatedMTT(torch.autograd.Function):
    """The truncated (constant-memory, TESLA-style) MTT loss as an autograd function.

    forward (pass 1): the student's trajectory with every theta_i detached, keeping only
    G = sum_i g_i; loss = ||start - alpha G - target||^2 / ||start - target||^2.
    backward (pass 2): walks the trajectory again (same arithmetic, so the same theta_i)
    and takes d(g_i . v)/d images step by step, v = -2 alpha r / D: one step's graph alive
    at a time, so memory does not grow with the number of steps; dL/dalpha = -2 G.r / D.
    Split across processes (`comm`), every g_i is the sum of all processes' micro-batch
    parts added in rank order (in both passes), so every process walks the same theta_i:
    when the micro-batches never straddle two processes (`--micro-batch` dividing IPC, no
    `--batch-syn`), the same bits as one process adding the same micro-batches.
    """

    @staticmethod
    def forward(ctx, images, alpha, student, start, target, labels, plan, dsa, micro_batch, comm):
        from .ops import mtt_truncated_terms

        alpha_value = alpha.detach()
        grad_sum = torch.zeros_like(start)
        theta = start
        with torch.enable_grad():
            for step in plan:
                index, draw, count = _step_parts(step)
                theta = theta.detach().requires_grad_(True)
                with torch.no_grad():
                    x_aug = augment(dsa, images[index], draw) if index.numel() else images[index]
                parts = student_gradient_parts(student, theta, x_aug, labels[index], micro_batch, count=count)
                g = _sum_in_order(comm, parts, theta)
                grad_sum += g
                theta = theta.detach() - alpha_value * g
        loss, v, dloss_dalpha = mtt_truncated_terms(start, grad_sum, target, alpha_value)
        ctx.save_for_backward(images, start, labels, v, dloss_dalpha)
        ctx.student, ctx.plan, ctx.dsa, ctx.micro_batch, ctx.comm = student, plan, dsa, micro_batch, comm
        ctx.alpha = alpha_value
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        images, start, labels, v, dloss_dalpha = ctx.saved_tensors
        image_grad = torch.zeros_like(images)
        theta = start
        with torch.enable_grad():
            for step in ctx.plan:
                index, draw, count = _step_parts(step)
                theta = theta.detach().requires_grad_(True)
                parts = []
                if index.numel():  # else none of this step's images here: only the trajectory
                    x = images[index].detach().requires_grad_(True)
                    x_aug = augment(ctx.dsa, x, draw)
                    aug_grad = torch.zeros_like(x_aug)
                    targets = labels[index]
                    for part in micro_batches(x_aug.shape[0], ctx.micro_batch):
                        x_part = x_aug[part].detach().requires_grad_(True)
                        loss_part = F.cross_entropy(ctx.student(theta, x_part), targets[part],
                                                    reduction="sum") / count
                        (g_part,) = torch.autograd.grad(loss_part, theta, create_graph=True)
                        (aug_grad[part],) = torch.autograd.grad(g_part, x_part, grad_outputs=v)
                        parts.append(g_part.detach())
                    if x_aug.requires_grad:
                        (step_grad,) = torch.autograd.grad(x_aug, x, grad_outputs=aug_grad)
                    else:
                        step_grad = aug_grad
                    image_grad.index_add_(0, index, step_grad)
                theta = theta.detach() - ctx.alpha * _sum_in_order(ctx.comm, parts, theta)
        lr_grad = (dloss_dalpha * grad_loss).to(ctx.alpha.dtype).reshape(ctx.alpha.shape)
        return image_grad * grad_loss, lr_grad, None, None, None, None, None, None, None, None


def mtt_loss_from_plan(student, images, labels, alpha, start, target, plan, *, dsa=None,
                       micro_batch: int | None = None, gradient: str = "truncated", comm=None) -> torch.Tensor:
    """The MTT loss for a drawn `plan` (the piece `mtt_loss` and the MTT object share).

    gradient="truncated": value = the loss, gradient = the truncated form (`_TruncatedMTT`);
    gradient="full": exact autograd through all unrolled steps (memory grows with them).

    comm (`ld3m_fast.distributed`, None: one process): `images` are this process's part of
    the synthetic set and the plan's steps its parts (index, draw, whole batch size); every
    step's parameter gradient is summed over the processes (all-reduce), so every process
    gets the same loss and dL/dalpha, and the gradient of its own images.
    """
    if gradient == "truncated":
        return _TruncatedMTT.apply(images, alpha, student, start, target, labels, plan, dsa, micro_batch, comm)
    if gradient != "full":
        raise LD3MError(f"unknown MTT gradient {gradient!r}; choose one of {', '.join(MTT_GRADIENTS)}")
    from .ops import trajectory_matching_distance

    theta = start.clone().requires_grad_(True)
    for step in plan:
        index, draw, count = _step_parts(step)
        # Split: theta is the same on every process, and each one's part of the step uses it,
        # so its gradient is summed over the processes (`replicated`); the parts of g are summed
        # forward (`sum_across_ranks`). One process: both are the identity.
        theta_in = theta if comm is None else comm.replicated(theta)
        x_aug = augment(dsa, images[index], draw) if index.numel() else images[index]
        g = student_gradient(student, theta_in, x_aug, labels[index], micro_batch, create_graph=True, count=count)
        theta = theta - alpha * (g if comm is None else comm.sum_across_ranks(g))
    return trajectory_matching_distance(theta, start, target)


def mtt_loss(syn_images: torch.Tensor, syn_labels: torch.Tensor, network, start: torch.Tensor,
             target: torch.Tensor, student_lr, *, syn_steps: int = 10, gradient: str = "truncated",
             batch_syn: int | None = None, dsa=None, dsa_generator: torch.Generator | None = None,
             generator: torch.Generator | None = None, micro_batch: int | None = None) -> torch.Tensor:
    """Matching training trajectories (Cazenavette et al. 2022), the loss of LD3M's MTT.

    A student starts at the expert parameters `start` (P,), takes `syn_steps` SGD steps
    theta <- theta - student_lr * dCE/dtheta on the (augmented) synthetic images and is
    compared with the expert's later parameters `target` (P,):

        L = ||theta_N - target||^2 / ||start - target||^2

    network: an nn.Module (evaluated at the flat vector with `functional_call`, parameters
        in `named_parameters()` order; its own values are not used) or a callable
        `(theta, x) -> logits`.
    student_lr: a float or a 0-d tensor (give it requires_grad to learn it).
    gradient: "truncated" (default, the released constant-memory form: the loss value is
        exact, its gradient treats every theta_i as a constant) or "full" (exact unroll).
    Returns a 0-d tensor; autograd gives dL/d syn_images (and dL/d student_lr).
    """
    _check_images(syn_images)
    if gradient not in MTT_GRADIENTS:
        raise LD3MError(f"unknown MTT gradient {gradient!r}; choose one of {', '.join(MTT_GRADIENTS)}")
    student = FlatNetwork(network) if isinstance(network, nn.Module) else network
    if start.shape != target.shape or start.dim() != 1:
        raise LD3MError(f"start and target must be flat (P,) parameter vectors of one shape, got "
                        f"{tuple(start.shape)} and {tuple(target.shape)}")
    alpha = student_lr if isinstance(student_lr, torch.Tensor) else torch.tensor(
        float(student_lr), dtype=start.dtype, device=start.device)
    plan = mtt_plan(syn_images.shape[0], syn_steps, batch_syn=batch_syn, dsa=dsa, generator=generator,
                    dsa_generator=dsa_generator, device=syn_images.device)
    return mtt_loss_from_plan(student, syn_images, syn_labels, alpha, start, target, plan, dsa=dsa,
                              micro_batch=micro_batch, gradient=gradient)


__all__ = ["FlatNetwork", "MTT_GRADIENTS", "REAL_FORWARD_BYTES", "RealBlock", "class_gradient", "class_groups",
           "class_mean_embeddings", "dc_class_term", "dc_loss", "dm_class_distances", "dm_distance", "dm_loss",
           "dm_loss_from_blocks", "gradient_distance", "micro_batches", "mtt_loss", "mtt_loss_from_plan",
           "mtt_plan", "real_class_means", "student_gradient", "student_gradient_parts"]
