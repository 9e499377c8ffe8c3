"""One distillation iteration: the code path shared by the loop and the planner.

    noise (drawn by the caller, once per iteration)
    -> images = generator(Z, c, noise)                     "render"
    -> loss, dL/dimages = algorithm.image_gradient(...)    "distill"
    -> images.backward(dL/dimages) into Z and c            "backward"
    -> all-reduce (sum) of the Z and c gradients over the processes
    -> optimiser step on Z, c (and the algorithm's own parameters)

Distributed (`context.rows`, `context.comm`): this process renders and differentiates only
its own rows of Z and c (its classes); the gradient rows of the other processes' images
are exact zeros here, so the sum gives every process the whole gradient exactly and the
identical optimiser step keeps Z and c identical everywhere. One process: rows is None
and the all-reduce does nothing.

Class groups (`render_groups`): the render pass of a generator with stored steps keeps state
for every image it renders until backward consumes it. A per-class objective (DM, DC) in a
seeded context draws its student, real batches and augmentation from stateless streams, so
it gives the same loss and gradient class group by class group: then each group of whole
classes that fills whole generator chunks is rendered, distilled and back-propagated before
the next, and only one group's stored state is live (the FLOPs are those of one pass).

`phase` is a context-manager factory the planner uses to attribute peak memory
to each stage; `check` sees the loss and the image gradient before anything is
pushed back (the loop stops on NaN/inf there; with class groups, after every group's
backward and before the optimiser step, once, since it may be a collective).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from .._host import host_values
from ..distributed import Single


def _no_phase(name: str):
    return nullcontext()


def render_groups(generator, algorithm, labels: torch.Tensor, context) -> list[slice]:
    """The rows rendered, distilled and back-propagated together (see the module docstring):
    one group of all rows unless the generator keeps stored steps in chunks, the algorithm is
    per class and the context is seeded; then whole classes filling whole chunks."""
    chunk = getattr(generator, "chunk_size", None)
    if not (getattr(generator, "store_steps", 0) and chunk and getattr(algorithm, "per_class", False)
            and context.seed is not None):
        return [slice(None)]
    with host_values():
        _, counts = torch.unique_consecutive(labels, return_counts=True)
    groups, start, size = [], 0, 0
    for count in counts.tolist():
        size += count
        if size % chunk == 0:
            groups.append(slice(start, start + size))
            start, size = start + size, 0
    if size:
        groups.append(slice(start, start + size))
    return groups if len(groups) > 1 else [slice(None)]


def distill_iteration(generator, synthetic, algorithm, context, optimizer, noise, *,
                      phase=_no_phase, check=None, scaler=None):
    """Run one iteration; returns (loss tensor (0-d), rendered images (detached)).

    scaler: a `torch.amp.GradScaler` (fp16): the image gradient is scaled before it is pushed
    back, and the step unscales the gradients and skips itself when they overflowed."""
    optimizer.zero_grad(set_to_none=True)
    scale = (lambda grad: grad) if scaler is None else scaler.scale
    rows = context.rows
    Z, c, labels = synthetic.Z, synthetic.c, synthetic.labels
    if rows is not None:
        Z, c = Z[rows], c[rows]
        with host_values():  # labels are host bookkeeping (real even while the planner fakes tensors)
            labels = labels[rows]
    groups = render_groups(generator, algorithm, labels, context)
    if len(groups) == 1:
        with phase("render"):
            images = generator(Z, c, noise)
        with phase("distill"):
            loss, image_grad = algorithm.image_gradient(images.detach(), labels, context)
        if check is not None:
            check(loss, image_grad)
        with phase("backward"):
            images.backward(scale(image_grad))
    else:
        loss, images, image_grad = _by_class_groups(generator, algorithm, context, Z, c, labels, noise,
                                                    groups, phase, scale)
        if check is not None:
            check(loss, image_grad)
    with phase("backward"):
        context.comm.sum_grads_([synthetic.Z, synthetic.c])
        if scaler is None:
            optimizer.step()
        else:
            _scaled_step(scaler, optimizer, (synthetic.Z, synthetic.c))
        algorithm.after_step()
    return torch.as_tensor(loss), images.detach()


def _scaled_step(scaler, optimizer, pushed_back) -> None:
    """The gradient scaler's step: Z's and c's gradients came through the scaled backward; the
    algorithm's own (MTT's dL/dalpha) were computed unscaled, so they are scaled alike first."""
    factor = scaler.get_scale()
    scaled = {id(p) for p in pushed_back}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and id(p) not in scaled:
                p.grad.mul_(factor)
    scaler.step(optimizer)
    scaler.update()


def _by_class_groups(generator, algorithm, context, Z, c, labels, noise, groups, phase, scale):
    """Render, distill and back-propagate one class group at a time; returns (the loss summed over
    the groups and the processes, the images, dL/dimages). The groups' losses are reduced over
    the processes once, at the end (ranks may hold different numbers of groups)."""
    local = replace(context, comm=Single())
    loss, images, image_grads = 0.0, [], []
    for group in groups:
        with phase("render"):
            group_images = generator(Z[group], c[group], noise.select(group))
        with phase("distill"):
            with host_values():
                group_labels = labels[group]
            group_loss, image_grad = algorithm.image_gradient(group_images.detach(), group_labels, local)
        with phase("backward"):
            group_images.backward(scale(image_grad))
        loss = loss + group_loss.detach()
        images.append(group_images.detach())
        image_grads.append(image_grad)
    return context.comm.all_reduce_(loss), torch.cat(images), torch.cat(image_grads)
