"""One distillation iteration: the code path shared by the loop and the planner.

    noise (drawn by the caller, once per iteration)
    -> images = generator(Z, c, noise)                     "render"
    -> loss, dL/dimages = algorithm.image_gradient(...)    "distill"
    -> images.backward(dL/dimages) into Z and c            "backward"
    -> optimiser step on Z, c (and the algorithm's own parameters)

`phase` is a context-manager factory the planner uses to attribute peak memory
to each stage; `check` sees the loss and the image gradient before anything is
pushed back (the loop stops on NaN/inf there).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def _no_phase(name: str):
    return nullcontext()


def distill_iteration(generator, synthetic, algorithm, context, optimizer, noise, *,
                      phase=_no_phase, check=None):
    """Run one iteration; returns (loss tensor (0-d), rendered images (detached))."""
    optimizer.zero_grad(set_to_none=True)
    with phase("render"):
        images = generator(synthetic.Z, synthetic.c, noise)
    with phase("distill"):
        loss, image_grad = algorithm.image_gradient(images.detach(), synthetic.labels, context)
    if check is not None:
        check(loss, image_grad)
    with phase("backward"):
        images.backward(image_grad)
        optimizer.step()
        algorithm.after_step()
    return torch.as_tensor(loss), images.detach()
