"""Released-style DM and DC losses, written plainly: the oracles for `ld3m_fast.losses`.

The released LD3M / DM code loops over classes; per class it takes a real batch and the
class's synthetic images, augments both with one shared (Siamese) DSA draw, embeds the
real batch without a graph and the synthetic images with one, and adds the squared
distance of the two mean embeddings. DC does the same with per-layer CE gradients.
Nothing is batched across classes and nothing is micro-batched: one full-batch forward
per class and side, the graph of every class alive until the one backward.

`real_for_class(k)` returns class k's real images as a float tensor: a function rather
than a tensor so that a caller can draw the real batch of class k right before that
class's augmentation, as the released loop (and ld3m-fast's DM/DC objects) do.

`ReleasedDM` / `ReleasedDC` wrap these losses in the loop's algorithm interface
(`image_gradient(images, labels, ctx)`), which is what the benchmarks run on the
released side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _classes(labels: torch.Tensor) -> list[int]:
    return sorted(int(k) for k in torch.unique(labels.cpu()).tolist())


def _siamese(dsa, dsa_generator, real, syn):
    if dsa is None:
        return real, syn
    draw = dsa.draw(max(real.shape[0], syn.shape[0]), dsa_generator, real.device)
    return dsa.apply(real, draw), dsa.apply(syn, draw)


def dm_loss_ref(network, syn_images, syn_labels, real_for_class, *, dsa=None, dsa_generator=None):
    """sum_k || mean embed(aug(real_k)) - mean embed(aug(syn_k)) ||^2, one class at a time.

    network: module with `embed(x) -> (B, F)`; syn_images (N, C, H, W) float;
    syn_labels (N,) long. Returns a 0-d tensor differentiable in syn_images.
    """
    loss = syn_images.new_zeros(())
    for k in _classes(syn_labels):
        real = real_for_class(k)
        syn = syn_images[syn_labels == k]
        real, syn = _siamese(dsa, dsa_generator, real, syn)
        with torch.no_grad():
            real_embedding = network.embed(real)
        syn_embedding = network.embed(syn)
        loss = loss + ((real_embedding.mean(0) - syn_embedding.mean(0)) ** 2).sum()
    return loss


def gradient_distance_ref(real_grads, syn_grads):
    """The released `match_loss` ("ours" metric): per layer, sum over output rows of
    1 - cosine(real row, synthetic row); 1-D parameters contribute nothing."""
    total = 0.0
    for g_real, g_syn in zip(real_grads, syn_grads):
        if g_real.dim() == 1:
            continue
        a = g_real.reshape(g_real.shape[0], -1)
        b = g_syn.reshape(g_syn.shape[0], -1)
        total = total + torch.sum(1 - torch.sum(a * b, dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 0.000001))
    return total


def dc_loss_ref(network, syn_images, syn_labels, real_for_class, *, dsa=None, dsa_generator=None):
    """sum_k D(dCE(aug(real_k), k)/dtheta, dCE(aug(syn_k), k)/dtheta), one class at a time.

    network: module mapping images to logits; theta: its parameters that require grad.
    Returns a 0-d tensor differentiable in syn_images (through create_graph).
    """
    params = [p for p in network.parameters() if p.requires_grad]
    loss = syn_images.new_zeros(())
    for k in _classes(syn_labels):
        real = real_for_class(k)
        syn = syn_images[syn_labels == k]
        real, syn = _siamese(dsa, dsa_generator, real, syn)
        real_target = torch.full((real.shape[0],), k, dtype=torch.long, device=real.device)
        syn_target = torch.full((syn.shape[0],), k, dtype=torch.long, device=syn.device)
        g_real = torch.autograd.grad(F.cross_entropy(network(real), real_target), params)
        g_syn = torch.autograd.grad(F.cross_entropy(network(syn), syn_target), params, create_graph=True)
        loss = loss + gradient_distance_ref([g.detach() for g in g_real], g_syn)
    return loss


class _Released:
    """The loop's algorithm interface around a released-style loss (see module docstring)."""

    name = ""
    loss = None
    default_lr_latent = 1.0
    default_lr_class = 1.0

    def __init__(self, network, batch_real: int = 256):
        self.network = network  # an ld3m_fast.distill.algorithms.NetworkSpec
        self.batch_real = int(batch_real)

    def image_gradient(self, images, labels, ctx):
        from ..networks import ConvNet
        from .convnet import ConvNetRef

        net = self.network.build_seeded(ctx.stream("network"))
        if isinstance(net, ConvNet):  # the released layer stack, same weights
            net = ConvNetRef.from_network(net)
        net = net.to(ctx.device)
        if self.name == "dm":
            net.requires_grad_(False)
        x = images.detach().requires_grad_(True)
        loss = type(self).loss(net, x, labels,
                               lambda k: ctx.real.sample(k, self.batch_real, ctx.stream("real", k), ctx.device),
                               dsa=ctx.dsa, dsa_generator=ctx.stream("dsa"))
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def parameters(self):
        return []

    def after_step(self):
        pass

    def to(self, device):
        return self


class ReleasedDM(_Released):
    """DM as the released loop runs it: per class, full batch (`dm_loss_ref`)."""

    name = "dm"
    loss = staticmethod(dm_loss_ref)


class ReleasedDC(_Released):
    """DC's first outer step as the released loop runs it: per class, full batch (`dc_loss_ref`)."""

    name = "dc"
    loss = staticmethod(dc_loss_ref)
    default_lr_latent = 0.1
    default_lr_class = 0.1


__all__ = ["ReleasedDC", "ReleasedDM", "dc_loss_ref", "dm_loss_ref", "gradient_distance_ref"]
