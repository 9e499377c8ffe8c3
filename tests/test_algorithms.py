"""DM, DC and MTT: each lowers its own loss; MTT's two gradient forms against brute force."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ld3m_fast import LD3MGenerator, SyntheticSet, build_tiny_prior
from ld3m_fast.data import load_dataset
from ld3m_fast.distill.algorithms import (DC, DM, MTT, NetworkSpec, RealData, StepContext,
                                          gradient_distance)
from ld3m_fast.distill.buffers import ExpertTrajectory, flatten_parameters
from ld3m_fast.dsa import DSA

RES = 16


def assert_close(actual, expected, rtol=1e-4, atol=1e-6, what=""):
    diff = (actual - expected).abs()
    limit = atol + rtol * expected.abs()
    bad = diff > limit
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; "
                           f"max |diff| {float(diff.max()):.3e} at {int(diff.argmax())}, "
                           f"scale {float(expected.abs().max()):.3e}")


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    data = load_dataset("fashion-mnist", split="train", res=RES, max_per_class=6,
                        cache_dir=tmp_path_factory.mktemp("cache"))
    return data


@pytest.fixture(scope="module")
def prior():
    return build_tiny_prior(num_classes=10, image_size=RES, seed=0)


def context(real, seed, dsa=True):
    return StepContext(real=real, generator=torch.Generator().manual_seed(seed),
                       dsa=DSA() if dsa else None, dsa_generator=torch.Generator().manual_seed(seed + 1))


def small_net(num_classes=10, res=RES):
    return NetworkSpec(num_classes=num_classes, res=res, width=8)


def toy_trajectories(spec, count=2, snapshots=5, seed=0):
    """Expert-like trajectories: a random init plus a random walk (fast; no training)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        net = spec.build_seeded(g)
        theta0 = flatten_parameters(net)
        steps = 0.02 * torch.randn(snapshots - 1, theta0.numel(), generator=g)
        epochs = torch.cat([theta0[None], theta0 + steps.cumsum(0)])
        out.append(ExpertTrajectory(epochs, [n for n, _ in net.named_parameters()],
                                    [tuple(p.shape) for p in net.parameters()], {}))
    return out


def descend(algorithm, prior, real_data, iterations, lr):
    """Optimise Z, c through the generator on a fixed draw; return the loss per iteration."""
    gen = LD3MGenerator(prior, steps=2, guidance=1.0)
    syn = SyntheticSet.from_real(prior, real_data.images, real_data.labels, 1, torch.Generator().manual_seed(0))
    noise = gen.draw_noise(len(syn), torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD([syn.Z, syn.c] + algorithm.parameters(), lr=lr, momentum=0.5)
    real = RealData(real_data.images, real_data.labels, real_data.num_classes)
    losses = []
    for _ in range(iterations):
        optimizer.zero_grad()
        images = gen(syn.Z, syn.c, noise)
        # The same network / real batch / augmentation every iteration: a fixed objective.
        loss, grad = algorithm.image_gradient(images.detach(), syn.labels, context(real, 7))
        if algorithm.parameters():  # keep MTT's student lr fixed here: test the image path
            algorithm.parameters()[0].grad = None
        images.backward(grad)
        optimizer.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name, lr", [("dm", 1.0), ("dc", 0.1), ("mtt", 30.0)])
def test_algorithm_lowers_its_loss(name, lr, prior, real_data):
    spec = small_net()
    if name == "dm":
        algorithm = DM(spec, batch_real=6)
    elif name == "dc":
        algorithm = DC(spec, batch_real=6)
    else:
        algorithm = MTT(spec, toy_trajectories(spec), syn_steps=3, expert_epochs=2, max_start_epoch=2,
                        student_lr=0.01)
    losses = descend(algorithm, prior, real_data, iterations=5, lr=lr)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_gradient_distance_definition():
    g = torch.Generator().manual_seed(0)
    conv_r, conv_s = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    lin_r, lin_s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    bias = torch.randn(5, generator=g)
    expected = sum((1 - F.cosine_similarity(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1),
                                            dim=-1, eps=0)).sum()
                   for a, b in ((conv_r, conv_s), (lin_r, lin_s)))
    got = gradient_distance([conv_r, lin_r, bias], [conv_s, lin_s, bias * 3])  # 1-D skipped
    assert_close(got, expected, rtol=1e-5, what="distance")
    assert float(gradient_distance([lin_r], [2.5 * lin_r])) == pytest.approx(0.0, abs=1e-5)


def _mtt_case(gradient, micro_batch=None, syn_steps=3, dsa=True):
    spec = NetworkSpec(num_classes=3, res=8, width=4, depth=2)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    mtt = MTT(spec, toy_trajectories(spec, snapshots=4), syn_steps=syn_steps, expert_epochs=2,
              max_start_epoch=2, student_lr=0.05, gradient=gradient, micro_batch=micro_batch)
    return spec, mtt, images, labels, (lambda: context(None, 11, dsa=dsa))


def _brute_force_inputs(mtt, images, ctx):
    start, target = mtt.draw_expert(ctx.generator)
    plan = mtt.draw_steps(images.shape[0], ctx)
    return start, target, plan


def _ce(module, names, shapes, theta, x, y):
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    params = {n: p.view(s) for n, p, s in zip(names, torch.split(theta, sizes), shapes)}
    return F.cross_entropy(functional_call(module, params, (x,)), y)


def test_mtt_truncated_matches_brute_force_surrogate():
    spec, mtt, images, labels, make_ctx = _mtt_case("truncated")
    loss, image_grad = mtt.image_gradient(images, labels, make_ctx())
    lr_grad = mtt.student_lr.grad.clone()

    # Brute force: one autograd graph over the whole truncated surrogate
    #   S(x, alpha) = ||start - alpha * sum_i g_i(theta_i, x) - target||^2 / ||start - target||^2
    # with every theta_i a constant (the detached forward trajectory).
    ctx = make_ctx()
    start, target, plan = _brute_force_inputs(mtt, images, ctx)
    module, names, shapes = mtt.student.module, mtt.student.names, mtt.student.shapes
    x = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.05, requires_grad=True)
    theta, grad_sum = start.clone(), 0
    for index, draw in plan:
        theta_i = theta.detach().requires_grad_(True)
        g_i, = torch.autograd.grad(_ce(module, names, shapes, theta_i, ctx.dsa.apply(x[index], draw),
                                       labels[index]), theta_i, create_graph=True)
        grad_sum = grad_sum + g_i
        theta = theta_i.detach() - 0.05 * g_i.detach()
    surrogate = (start - alpha * grad_sum - target).pow(2).sum() / (start - target).pow(2).sum()
    surrogate.backward()
    assert float(loss) == pytest.approx(float(surrogate.detach()), rel=1e-5)
    assert_close(image_grad, x.grad, rtol=1e-4, atol=1e-7, what="image gradient")
    assert_close(lr_grad, alpha.grad, rtol=1e-4, atol=1e-7, what="student lr gradient")


def test_mtt_micro_batches_are_exact():
    _, whole, images, labels, make_ctx = _mtt_case("truncated")
    _, split, *_ = _mtt_case("truncated", micro_batch=4)
    loss_a, grad_a = whole.image_gradient(images, labels, make_ctx())
    loss_b, grad_b = split.image_gradient(images, labels, make_ctx())
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-5)
    assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-7, what="micro-batched gradient")


def test_mtt_full_matches_plain_autograd_unroll():
    spec, mtt, images, labels, make_ctx = _mtt_case("full")
    loss, image_grad = mtt.image_gradient(images, labels, make_ctx())
    lr_grad = mtt.student_lr.grad.clone()

    # Plain autograd through the unrolled student, parameters as a dict of tensors.
    ctx = make_ctx()
    start, target, plan = _brute_force_inputs(mtt, images, ctx)
    module, names, shapes = mtt.student.module, mtt.student.names, mtt.student.shapes
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    params = {n: p.view(s).clone().requires_grad_(True)
              for n, p, s in zip(names, torch.split(start, sizes), shapes)}
    x = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.05, requires_grad=True)
    for index, draw in plan:
        out = functional_call(module, params, (ctx.dsa.apply(x[index], draw),))
        grads = torch.autograd.grad(F.cross_entropy(out, labels[index]), list(params.values()),
                                    create_graph=True)
        params = {n: p - alpha * g for (n, p), g in zip(params.items(), grads)}
    final = torch.cat([p.reshape(-1) for p in params.values()])
    plain = (final - target).pow(2).sum() / (start - target).pow(2).sum()
    plain.backward()
    assert float(loss) == pytest.approx(float(plain.detach()), rel=1e-5)
    assert_close(image_grad, x.grad, rtol=1e-4, atol=1e-7, what="image gradient")
    assert_close(lr_grad, alpha.grad, rtol=1e-4, atol=1e-7, what="student lr gradient")


def test_mtt_forms_agree_for_one_step():
    # With one student step theta_0 = start is a constant, so truncation is exact.
    _, truncated, images, labels, make_ctx = _mtt_case("truncated", syn_steps=1)
    _, full, *_ = _mtt_case("full", syn_steps=1)
    loss_t, grad_t = truncated.image_gradient(images, labels, make_ctx())
    loss_f, grad_f = full.image_gradient(images, labels, make_ctx())
    assert float(loss_t) == pytest.approx(float(loss_f), rel=1e-5)
    assert_close(grad_t, grad_f, rtol=1e-4, atol=1e-7, what="truncated vs full, 1 step")
    assert_close(truncated.student_lr.grad, full.student_lr.grad, rtol=1e-4, atol=1e-7, what="lr grad")


def test_mtt_student_lr_stays_positive():
    spec, mtt, *_ = _mtt_case("truncated")
    with torch.no_grad():
        mtt.student_lr.fill_(-1.0)
    mtt.after_step()
    assert float(mtt.student_lr.detach()) > 0


def test_seeded_network_init_ignores_global_rng():
    spec = small_net()
    torch.manual_seed(123)
    a = spec.build_seeded(torch.Generator().manual_seed(5))
    state = torch.random.get_rng_state()
    torch.manual_seed(999)
    b = spec.build_seeded(torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    torch.manual_seed(123)
    spec.build_seeded(torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left untouched


def _plain_dm(algorithm, images, labels, ctx):
    """DM in one pass with autograd through the full batch: the oracle for micro-batching."""
    net = algorithm.network.build_seeded(ctx.generator)
    net.requires_grad_(False)
    x = images.detach().requires_grad_(True)
    total = 0.0
    for cls in range(int(labels.max()) + 1):
        index = torch.nonzero(labels == cls).flatten()
        real = ctx.real.sample(cls, algorithm.batch_real, ctx.generator, ctx.device)
        draw = ctx.dsa.draw(max(real.shape[0], index.numel()), ctx.dsa_generator, real.device)
        real_mean = net.embed(ctx.dsa.apply(real, draw)).mean(0)
        syn_mean = net.embed(ctx.dsa.apply(x[index], draw)).mean(0)
        total = total + (real_mean - syn_mean).pow(2).sum()
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


def _plain_dc(algorithm, images, labels, ctx):
    """DC with create_graph over the whole class batch: the oracle for micro-batching."""
    net = algorithm.network.build_seeded(ctx.generator)
    params = list(net.parameters())
    x = images.detach().requires_grad_(True)
    total = 0.0
    for cls in range(int(labels.max()) + 1):
        index = torch.nonzero(labels == cls).flatten()
        real = ctx.real.sample(cls, algorithm.batch_real, ctx.generator, ctx.device)
        draw = ctx.dsa.draw(max(real.shape[0], index.numel()), ctx.dsa_generator, real.device)
        real_aug, syn_aug = ctx.dsa.apply(real, draw), ctx.dsa.apply(x[index], draw)
        target = lambda n: torch.full((n,), cls, dtype=torch.long)  # noqa: E731
        g_real = torch.autograd.grad(F.cross_entropy(net(real_aug), target(real.shape[0])), params)
        g_syn = torch.autograd.grad(F.cross_entropy(net(syn_aug), target(index.numel())), params,
                                    create_graph=True)
        total = total + gradient_distance([g.detach() for g in g_real], g_syn)
    (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


@pytest.mark.parametrize("cls,plain", [(DM, _plain_dm), (DC, _plain_dc)])
@pytest.mark.parametrize("micro_batch", [None, 1, 2])
def test_dm_dc_micro_batches_equal_full_batch(real_data, cls, plain, micro_batch):
    """Two-pass micro-batching is exact with per-sample norm (the default instance norm)."""
    images = torch.randn(9, 3, RES, RES, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    real = RealData(real_data.images, real_data.labels, real_data.num_classes)
    algorithm = cls(small_net(), batch_real=5, micro_batch=micro_batch)
    loss, grad = algorithm.image_gradient(images, labels, context(real, 21))
    expected_loss, expected_grad = plain(algorithm, images, labels, context(real, 21))
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-4)
    assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6 * float(expected_grad.abs().max()),
                 what=f"{cls.name} micro-batch {micro_batch}")


@pytest.mark.parametrize("cls", [DM, DC])
def test_micro_batches_refuse_batch_norm(cls):
    from ld3m_fast.errors import LD3MError

    spec = NetworkSpec(num_classes=3, res=RES, width=8, norm="batch")
    with pytest.raises(LD3MError, match="batch statistics"):
        cls(spec, micro_batch=2)
    cls(spec)  # full batch stays allowed


_FAULTS_SCRIPT = """
import os, resource, sys
from ld3m_fast._memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
import torch
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(12 * 2**20)  # 48 MiB (above glibc's largest mmap threshold), written, freed
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def test_keep_freed_memory_reuses_freed_blocks_without_faulting():
    """The allocator setting the CLI applies: once the heap has settled (glibc needs a few
    rounds before a freed 64-byte-aligned block fits the next request of its size), a freed
    48 MiB block comes back without page faults; without the setting every round faults its
    12,288 pages in again. Elsewhere than glibc the setting reports that it does not apply."""
    import os
    import subprocess
    import sys

    results = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        applied, *faults = out.stdout.split()
        results[mode] = (applied == "True", [int(f) for f in faults])
    if not results["on"][0]:
        pytest.skip("not glibc: keep_freed_memory does not apply")
    assert min(results["off"][1]) > 10_000
    assert sum(results["on"][1][-4:]) < 1_000, results["on"][1]
    env_off = subprocess.run([sys.executable, "-c", "from ld3m_fast._memory import keep_freed_memory as k; "
                              "print(k())"], capture_output=True, text=True, check=True,
                             env={**os.environ, "LD3M_FAST_KEEP_MEMORY": "0"})
    assert env_off.stdout.strip() == "False"
