"""The losses as functions, the fast ConvNet and the loop's objects against the released-style references.

Oracles: `ld3m_fast.reference.convnet.ConvNetRef` (the released layer stack) and
`ld3m_fast.reference.distill_losses` (per-class, full-batch DM and DC), all in float64,
where the fast paths must agree to rounding (they reorder sums, nothing else).
"""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _assertions import assert_close
from ld3m_fast import dc_loss, dm_loss, mtt_loss
from ld3m_fast.distill.algorithms import DC, DM, MTT, NetworkSpec, RealData, StepContext
from ld3m_fast.distill.buffers import ExpertTrajectory, flatten_parameters
from ld3m_fast.dsa import DSA
from ld3m_fast.errors import LD3MError
from ld3m_fast.losses import class_mean_embeddings
from ld3m_fast.networks import AvgPool2x2, ConvNet
from ld3m_fast.reference.convnet import ConvNetRef
from ld3m_fast.reference.distill_losses import ReleasedDM, dc_loss_ref, dm_loss_ref

RES = 16
DOUBLE = torch.float64
# float64 results that only reorder sums agree to ~1e-15 relative; leave room for long sums.
EXACT = dict(rtol=1e-9)


def _atol(reference: torch.Tensor) -> float:
    return 1e-12 * max(float(reference.detach().abs().max()), 1.0)


def _images(n, generator, res=RES, dtype=DOUBLE):
    return torch.randn(n, 3, res, res, generator=generator, dtype=dtype)


@pytest.fixture(scope="module")
def real_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3 * 7, 3, RES, RES), dtype=torch.uint8, generator=g)
    return RealData(images, torch.arange(3).repeat_interleave(7), 3)


def _context(real, seed, dsa=True):
    return StepContext(real=real, generator=torch.Generator().manual_seed(seed),
                       dsa=DSA() if dsa else None, dsa_generator=torch.Generator().manual_seed(seed + 1))


def _spec(num_classes=3, res=RES, depth=2, norm="instance"):
    return NetworkSpec(num_classes=num_classes, res=res, width=8, depth=depth, norm=norm)


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 1, 5, 4)])
def test_avg_pool_2x2_matches_avg_pool2d(shape):
    x = torch.randn(*shape, dtype=DOUBLE, requires_grad=True)
    out = AvgPool2x2()(x)
    expected = F.avg_pool2d(x, 2)
    assert_close(out, expected, atol=1e-15, name="pool forward")
    grad_out = torch.randn_like(expected)
    (got,) = torch.autograd.grad(out, x, grad_out)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    assert_close(got, want, atol=1e-15, name="pool backward")
    assert torch.autograd.gradcheck(AvgPool2x2(), (x,))
    assert torch.autograd.gradgradcheck(AvgPool2x2(), (x,))


def test_avg_pool_2x2_channels_last_and_float32_within_plain_error():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert_close(AvgPool2x2()(x), F.avg_pool2d(x, 2), atol=0, name="channels-last path")
    x = torch.randn(3, 5, 10, 10)
    oracle = F.avg_pool2d(x.double(), 2)
    plain_error = float((F.avg_pool2d(x, 2).double() - oracle).abs().max())
    assert_close(AvgPool2x2()(x), oracle, atol=2 * plain_error + 1e-7, name="float32 pool")


@pytest.mark.parametrize("norm", ["instance", "layer", "none", "batch"])
def test_convnet_matches_reference_forward_backward_double_backward(norm):
    torch.manual_seed(3)
    net = ConvNet(4, 3, 15, width=6, depth=2, norm=norm).double()
    ref = ConvNetRef.from_network(net)
    x = torch.randn(5, 3, 15, 15, dtype=DOUBLE, requires_grad=True)  # odd side: floor pooling
    out, expected = net(x), ref(x)
    assert_close(out, expected, atol=_atol(expected), **EXACT, name=f"{norm} logits")
    assert_close(net.embed(x), ref.embed(x), atol=_atol(expected), **EXACT, name=f"{norm} embed")
    # Second derivatives (DC and MTT): d/dx of (dCE/dparams . v).
    target = torch.arange(5) % 4
    grads = {}
    for name, model in (("fast", net), ("ref", ref)):
        params = list(model.parameters())
        g = torch.autograd.grad(F.cross_entropy(model(x), target), params, create_graph=True)
        v = [torch.ones_like(p) for p in params]
        grads[name] = torch.autograd.grad(g, x, v) + tuple(gi.detach() for gi in g)
    for got, want in zip(grads["fast"], grads["ref"]):
        assert_close(got, want, atol=_atol(want), **EXACT, name=f"{norm} gradients")


def test_convnet_parameter_names_are_unchanged():
    net = ConvNet(10, 3, 32, depth=3)
    assert [n for n, _ in net.named_parameters()][:4] == ["features.0.weight", "features.0.bias",
                                                           "features.1.weight", "features.1.bias"]
    assert sum(p.numel() for p in ConvNet(10, 3, 128, depth=5).parameters()) == 615_690


# --------------------------------------------------------------------------- DM


def _real_set(generator, per_class=5, classes=3):
    real = _images(per_class * classes, generator)
    return real, torch.arange(classes).repeat_interleave(per_class)


def _by_class(real, real_labels):
    return lambda k: real[real_labels == k]


@pytest.mark.parametrize("micro_batch", [None, 1, 4])
@pytest.mark.parametrize("use_dsa", [False, True])
def test_dm_loss_matches_released_reference(micro_batch, use_dsa):
    g = torch.Generator().manual_seed(1)
    net = ConvNet(3, 3, RES, width=8, depth=2).double().requires_grad_(False)
    real, real_labels = _real_set(g)
    syn_labels = torch.tensor([2, 0, 1, 0, 2, 1, 1])  # unsorted, unequal counts
    syn = _images(len(syn_labels), g)
    dsa = DSA() if use_dsa else None

    x = syn.clone().requires_grad_(True)
    loss = dm_loss(x, syn_labels, real, real_labels, net, dsa=dsa,
                   dsa_generator=torch.Generator().manual_seed(5), micro_batch=micro_batch)
    (grad,) = torch.autograd.grad(loss, x)

    x_ref = syn.clone().requires_grad_(True)
    expected = dm_loss_ref(ConvNetRef.from_network(net), x_ref, syn_labels, _by_class(real, real_labels),
                           dsa=dsa, dsa_generator=torch.Generator().manual_seed(5))
    (expected_grad,) = torch.autograd.grad(expected, x_ref)
    assert_close(loss, expected, atol=_atol(expected), **EXACT, name="DM loss")
    assert_close(grad, expected_grad, atol=_atol(expected_grad), **EXACT, name="DM image gradient")


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_dm_object_matches_released_reference(real_data, micro_batch):
    """The loop's DM (one forward per side for all classes) against the per-class released loop,
    with the same generators consumed in the same order."""
    spec = _spec()
    images = _images(6, torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, grad = DM(spec, batch_real=5, micro_batch=micro_batch).image_gradient(images, labels,
                                                                               _context(real_data, 9))
    ctx = _context(real_data, 9)
    net = ConvNetRef.from_network(spec.build_seeded(ctx.generator).double()).requires_grad_(False)
    x = images.clone().requires_grad_(True)
    expected = dm_loss_ref(net, x, labels, lambda k: real_data.load(real_data.draw(k, 5, ctx.generator), "cpu", DOUBLE),
                           dsa=ctx.dsa, dsa_generator=ctx.dsa_generator)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert loss.dtype == grad.dtype == DOUBLE
    assert_close(loss, expected, atol=_atol(expected), **EXACT, name="DM loss")
    assert_close(grad, expected_grad, atol=_atol(expected_grad), **EXACT, name="DM image gradient")
    # Both generators end in the same state: nothing drawn more, less or in another order.
    assert torch.equal(ctx.generator.get_state(), _after(DM(spec, batch_real=5), images, labels, real_data).get_state())


def _after(algorithm, images, labels, real_data):
    ctx = _context(real_data, 9)
    algorithm.image_gradient(images, labels, ctx)
    return ctx.generator


def test_released_dm_adapter_matches_dm_object_in_float32(real_data):
    spec = _spec()
    images = _images(6, torch.Generator().manual_seed(4), dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, grad = DM(spec, batch_real=5).image_gradient(images, labels, _context(real_data, 3))
    ref_loss, ref_grad = ReleasedDM(spec, batch_real=5).image_gradient(images, labels, _context(real_data, 3))
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, name="loss")
    assert_close(grad, ref_grad, atol=1e-5 * float(ref_grad.abs().max()), rtol=1e-4, name="image gradient")


def test_class_means_recompute_needs_a_frozen_network():
    net = ConvNet(3, 3, 8, width=4, depth=1)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    with pytest.raises(LD3MError, match="frozen"):
        class_mean_embeddings(net, x, [2, 2], micro_batch=1)


# --------------------------------------------------------------------------- DC


@pytest.mark.parametrize("micro_batch", [None, 2])
def test_dc_loss_matches_released_reference(micro_batch):
    g = torch.Generator().manual_seed(6)
    net = ConvNet(3, 3, RES, width=6, depth=2).double()
    real, real_labels = _real_set(g, per_class=4)
    syn_labels = torch.tensor([0, 0, 1, 1, 1, 2])
    syn = _images(6, g)
    x = syn.clone().requires_grad_(True)
    loss = dc_loss(x, syn_labels, real, real_labels, net, dsa=DSA(),
                   dsa_generator=torch.Generator().manual_seed(8), micro_batch=micro_batch)
    (grad,) = torch.autograd.grad(loss, x)
    x_ref = syn.clone().requires_grad_(True)
    expected = dc_loss_ref(ConvNetRef.from_network(net), x_ref, syn_labels, _by_class(real, real_labels),
                           dsa=DSA(), dsa_generator=torch.Generator().manual_seed(8))
    (expected_grad,) = torch.autograd.grad(expected, x_ref)
    assert_close(loss, expected, atol=_atol(expected), **EXACT, name="DC loss")
    assert_close(grad, expected_grad, atol=_atol(expected_grad), **EXACT, name="DC image gradient")


@pytest.mark.parametrize("micro_batch", [None, 1])
def test_dc_object_matches_released_reference(real_data, micro_batch):
    spec = _spec()
    images = _images(6, torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, grad = DC(spec, batch_real=5, micro_batch=micro_batch).image_gradient(images, labels,
                                                                               _context(real_data, 13))
    ctx = _context(real_data, 13)
    net = ConvNetRef.from_network(spec.build_seeded(ctx.generator).double())
    x = images.clone().requires_grad_(True)
    expected = dc_loss_ref(net, x, labels, lambda k: real_data.load(real_data.draw(k, 5, ctx.generator), "cpu", DOUBLE),
                           dsa=ctx.dsa, dsa_generator=ctx.dsa_generator)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert_close(loss, expected, atol=_atol(expected), **EXACT, name="DC loss")
    assert_close(grad, expected_grad, atol=_atol(expected_grad), **EXACT, name="DC image gradient")


# --------------------------------------------------------------------------- MTT


def _mtt(gradient, batch_syn=None):
    spec = NetworkSpec(num_classes=3, res=8, width=4, depth=2)
    g = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(2):
        theta0 = flatten_parameters(spec.build_seeded(g))
        epochs = torch.cat([theta0[None], theta0 + (0.02 * torch.randn(3, theta0.numel(), generator=g)).cumsum(0)])
        module = spec.build()
        trajectories.append(ExpertTrajectory(epochs, [n for n, _ in module.named_parameters()],
                                             [tuple(p.shape) for p in module.parameters()], {}))
    return MTT(spec, trajectories, syn_steps=3, expert_epochs=2, max_start_epoch=2, student_lr=0.05,
               gradient=gradient, batch_syn=batch_syn)


@pytest.mark.parametrize("gradient, batch_syn", [("truncated", None), ("full", None), ("truncated", 4)])
def test_mtt_loss_matches_the_mtt_object(gradient, batch_syn):
    mtt = _mtt(gradient, batch_syn)
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, grad = mtt.image_gradient(images, labels, _context(None, 11))
    lr_grad = mtt.student_lr.grad.clone()

    ctx = _context(None, 11)
    start, target = mtt.draw_expert(ctx.generator)
    x = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.05, requires_grad=True)
    got = mtt_loss(x, labels, mtt.student.module, start, target, alpha, syn_steps=3, gradient=gradient,
                   batch_syn=batch_syn, dsa=ctx.dsa, dsa_generator=ctx.dsa_generator, generator=ctx.generator)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(loss), rel=1e-6)
    assert_close(x.grad, grad, atol=1e-7 * float(grad.abs().max()), rtol=1e-5, name="image gradient")
    assert_close(alpha.grad, lr_grad, atol=1e-8, rtol=1e-5, name="student lr gradient")


def test_mtt_loss_truncated_equals_full_for_one_step_and_takes_a_callable():
    spec = NetworkSpec(num_classes=2, res=8, width=4, depth=1)
    module = spec.build_seeded(torch.Generator().manual_seed(0)).double()
    start = torch.cat([p.detach().flatten() for p in module.parameters()])
    target = start + 0.05 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1), dtype=DOUBLE)
    images = torch.randn(4, 3, 8, 8, dtype=DOUBLE, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1])
    results = []
    for gradient in ("truncated", "full"):
        x = images.clone().requires_grad_(True)
        loss = mtt_loss(x, labels, module, start, target, 0.1, syn_steps=1, gradient=gradient)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss_t, grad_t), (loss_f, grad_f) = results
    assert_close(loss_t, loss_f, atol=1e-14, **EXACT, name="loss")
    assert_close(grad_t, grad_f, atol=_atol(grad_f), **EXACT, name="image gradient")

    from ld3m_fast.losses import FlatNetwork

    flat = FlatNetwork(module)
    x = images.clone().requires_grad_(True)
    mtt_loss(x, labels, lambda theta, batch: flat(theta, batch), start, target, 0.1, syn_steps=1).backward()
    assert_close(x.grad, grad_t, atol=0, name="callable student")


# --------------------------------------------------------------------------- errors and the docs


def test_user_errors_are_one_line_ld3m_errors():
    net = ConvNet(3, 3, 8, width=4, depth=1).requires_grad_(False)
    syn = torch.randn(2, 3, 8, 8, requires_grad=True)
    real = torch.randn(4, 3, 8, 8)
    with pytest.raises(LD3MError, match="no real images of class 1"):
        dm_loss(syn, torch.tensor([0, 1]), real, torch.zeros(4, dtype=torch.long), net)
    with pytest.raises(LD3MError, match="convert uint8"):
        dm_loss(syn, torch.tensor([0, 1]), real.to(torch.uint8), torch.tensor([0, 0, 1, 1]), net)
    with pytest.raises(LD3MError, match="dsa_generator"):
        dm_loss(syn, torch.tensor([0, 1]), real, torch.tensor([0, 0, 1, 1]), net, dsa=DSA())
    with pytest.raises(LD3MError, match="requires grad"):
        dc_loss(syn, torch.tensor([0, 1]), real, torch.tensor([0, 0, 1, 1]), net)
    with pytest.raises(LD3MError, match="unknown MTT gradient"):
        mtt_loss(syn, torch.tensor([0, 1]), net, torch.zeros(3), torch.ones(3), 0.1, gradient="exact")


def test_the_documented_examples_run():
    """docs/losses.md: another codebase's loop (own network, own optimiser, plain tensors)
    and the trajectory-matching drop-in, executed as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        namespace = {}
        exec(compile(block, "docs/losses.md", "exec"), namespace)
    first = {}
    exec(compile(blocks[0], "docs/losses.md", "exec"), first)
    assert first["syn"].grad is not None and torch.isfinite(first["syn"].grad).all()
    assert first["student_lr"].grad is not None


@pytest.mark.parametrize("batch", [None, 1, 3, 100])
def test_real_class_means_stream_across_classes(batch):
    """Forwards that span class boundaries (and loaders called only when reached) give the
    per-class means."""
    from ld3m_fast.losses import RealBlock, real_class_means

    net = ConvNet(3, 3, 8, width=4, depth=1).double().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(n, 3, 8, 8, generator=g, dtype=DOUBLE) for n in (5, 2, 4)]
    loaded = []

    def loader(k):
        loaded.append(k)
        return blocks[k]

    lazy = [RealBlock(b.shape[0], lambda k=k: loader(k)) for k, b in enumerate(blocks)]
    means = real_class_means(net, lazy, [None] * 3, batch=batch)
    expected = torch.stack([net.embed(b).mean(0) for b in blocks])
    assert loaded == [0, 1, 2]
    assert_close(means, expected, atol=_atol(expected), **EXACT, name="class means")
