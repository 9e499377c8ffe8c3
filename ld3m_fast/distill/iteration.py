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

`phase` is a context-manager factory the planner uses to attribute peak memory
to each stage; `check` sees the loss and the image gradient before anything is
pushed back (the loop stops on NaN/inf there).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .._host import host_values


def _no_phase(name: str):
    return nullcontext()


def distill_iteration(generator, synthetic, algorithm, context, optimizer, noise, *,
                      phase=_no_phase, check=None):
    """Run one iteration; returns (loss tensor (0-d), rendered images (detached))."""
    optimizer.zero_grad(set_to_none=True)
    rows = context.rows
    Z, c, labels = synthetic.Z, synthetic.c, synthetic.labels
    if rows is not None:
        Z, c = Z[rows], c[rows]
        with host_values():  # labels are host bookkeeping (real even while the planner fakes tensors)
            labels = labels[rows]
    with phase("render"):
        images = generator(Z, c, noise)
    with phase("distill"):
        loss, image_grad = algorithm.image_gradient(images.detach(), labels, context)
    if check is not None:
        check(loss, image_grad)
    with phase("backward"):
        images.backward(image_grad)
        context.comm.sum_grads_([synthetic.Z, synthetic.c])
        optimizer.step()
        algorithm.after_step()
    return torch.as_tensor(loss), images.detach()
