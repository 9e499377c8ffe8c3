"""--released-compat: each place where the released LD3M code differs from ld3m-fast, reproduced on
request, and the defaults unchanged (docs/released_compat.md)."""
import json
import math

import pytest
import torch

from ld3m_fast import ChainSchedule, LD3MGenerator, build_tiny_prior
from ld3m_fast.distill.algorithms import MTT, NetworkSpec, StepContext
from ld3m_fast.distill.buffers import ExpertTrajectory, flatten_parameters
from ld3m_fast.distill.config import DistillConfig
from ld3m_fast.distill.assemble import build_algorithm_for, generator_options
from ld3m_fast.errors import LD3MError
from ld3m_fast.generator import released_timesteps, render_size
from ld3m_fast.normalization import from_autoencoder, normalize_unit
from ld3m_fast.presets import with_preset

from _workspace import assert_one_line_error, distill_flags, make_workspace, run_cli


@pytest.fixture(scope="module")
def prior():
    return build_tiny_prior("unet-cond", "vq", seed=0).double()


def released_sampler(prior, Z, c, start_noise, steps, guidance):
    """The released sampler written out (prune_and_distill src/latentdiff/ldm/models/diffusion/ddim.py
    :127-200, util.py:48-57, glad_utils.py:997-1010): its own timestep list, skip weight
    index / (T' - 1), decode, clamp to [0, 1], normalise."""
    abar = prior.alphas_cumprod.tolist()
    timesteps = [t + 1 for t in range(0, len(abar), len(abar) // steps)]
    total = len(timesteps)
    z = math.sqrt(abar[timesteps[-1]]) * Z + math.sqrt(1 - abar[timesteps[-1]]) * start_noise
    anchor = prior.anchor(Z)
    null = prior.class_table[prior.null_index].expand_as(c)
    for i, t in enumerate(reversed(timesteps)):
        index = total - i - 1
        a_t, a_prev = abar[t], abar[timesteps[index - 1]] if index > 0 else abar[0]
        tt = torch.full((Z.shape[0],), t)
        eps_null = prior.eps(z, tt, null)
        eps = eps_null + guidance * (prior.eps(z, tt, c) - eps_null)
        x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x0 = (1 - index / (total - 1)) * x0 + index / (total - 1) * anchor
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return normalize_unit(((prior.decode(z) + 1) / 2).clamp(0, 1))


def _inputs(prior, batch=2):
    g = torch.Generator().manual_seed(0)
    Z = 3 * torch.randn(batch, *prior.latent_shape(), generator=g, dtype=torch.float64)  # wide: some pixels clamp
    c = prior.class_table[torch.arange(batch) % prior.num_classes].clone()
    return Z, c


# --------------------------------------------------------------------------- timesteps

def test_released_timesteps_run_t_plus_one_steps_where_t_does_not_divide_1000(prior):
    released = ChainSchedule.build(prior.alphas_cumprod, 6, spacing="released")
    assert released.timesteps == (997, 831, 665, 499, 333, 167, 1) and len(released) == 7
    assert released.skip_weight == tuple(k / 6 for k in range(6, -1, -1))  # w_k = k / (T' - 1), T' = 7
    default = ChainSchedule.build(prior.alphas_cumprod, 6)
    assert default.timesteps == (831, 665, 499, 333, 167, 1) and len(default) == 6
    assert default.skip_weight == tuple(k / 5 for k in range(5, -1, -1))
    # T=10 divides 1000: both lists are the same 10 steps.
    assert ChainSchedule.build(prior.alphas_cumprod, 10, spacing="released") == \
        ChainSchedule.build(prior.alphas_cumprod, 10)
    assert len(ChainSchedule.build(prior.alphas_cumprod, 10)) == 10
    assert [len(released_timesteps(1000, t)) for t in (30, 60, 70, 80, 90)] == [31, 63, 72, 84, 91]


@pytest.mark.parametrize("steps, why, advice", [
    (1, "division by zero", "use --steps 2"),
    (3, "reach 1000", "use --steps 2 or 4"),
    (9, "reach 1000", "use --steps 8 or 10"),
    (36, "reach 1000", "use --steps 35 or 38"),
])
def test_steps_the_released_sampler_fails_at_are_refused_in_one_line(prior, steps, why, advice):
    with pytest.raises(LD3MError) as error:
        LD3MGenerator(prior, steps, spacing="released")
    message = str(error.value)
    assert "\n" not in message and "--released-compat" in message and f"--steps {steps} " in message
    assert why in message and message.endswith(advice)
    assert len(LD3MGenerator(prior, steps).schedule) == steps  # the default runs exactly T


def test_the_compat_chain_is_the_released_sampler_and_its_gradient_modes_agree(prior):
    Z, c = _inputs(prior)
    gen = LD3MGenerator(prior, 6, guidance=3.0, grad_mode="autograd", spacing="released", clamp=True)
    assert gen.steps == 7
    noise = gen.draw_noise(2, torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        expected = released_sampler(prior, Z, c, noise.start, 6, 3.0)
        torch.testing.assert_close(gen(Z, c, noise), expected, rtol=1e-9, atol=1e-9)
    bounds = normalize_unit(torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1))
    assert ((expected == bounds[:1]) | (expected == bounds[1:])).any()  # some pixels were clamped
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for mode, knobs in (("autograd", {}), ("released", {"chunk_size": 1}), ("recompute", {"store_steps": 2})):
        g = LD3MGenerator(prior, 6, guidance=3.0, grad_mode=mode, spacing="released", clamp=True, **knobs)
        Z_, c_ = Z.clone().requires_grad_(), c.clone().requires_grad_()
        (g(Z_, c_, noise) * weights).sum().backward()
        grads[mode] = (Z_.grad, c_.grad)
    for mode in ("released", "recompute"):
        torch.testing.assert_close(grads[mode], grads["autograd"], rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- clamp

def test_clamp_zeroes_the_gradient_of_out_of_range_pixels_and_the_default_does_not(prior, monkeypatch):
    monkeypatch.setattr(prior, "decode", lambda z: z)  # the decoder's output is the input: pixels we choose
    x = torch.linspace(-1.5, 1.5, 3 * 4 * 4, dtype=torch.float64).view(1, 3, 4, 4)
    outside = (x < -1) | (x > 1)
    assert outside.any() and not outside.all()
    grads = {}
    for clamp in (False, True):
        gen = LD3MGenerator(prior, 2, clamp=clamp)
        z = x.clone().requires_grad_()
        images = gen.to_images(z)
        expected = normalize_unit(((x + 1) / 2).clamp(0, 1)) if clamp else from_autoencoder(x)
        assert torch.equal(images.detach(), expected)
        images.sum().backward()
        grads[clamp] = z.grad
    assert (grads[True][outside] == 0).all() and (grads[True][~outside] != 0).all()
    assert (grads[False] != 0).all()
    torch.testing.assert_close(grads[True][~outside], grads[False][~outside], rtol=0, atol=0)


def test_compat_renders_at_res_above_the_native_size(prior):
    assert render_size(prior, 64) == prior.image_size == 32  # ld3m-fast: native, then resized
    assert render_size(prior, 64, released=True) == 64       # released: the encoded res-sized latents
    assert render_size(prior, 16, released=True) == render_size(prior, 16) == 16


# --------------------------------------------------------------------------- MTT

def _toy_mtt(scale):
    spec = NetworkSpec(num_classes=3, res=8, width=4, depth=2)
    g = torch.Generator().manual_seed(0)
    trajectories = []
    for _ in range(2):
        net = spec.build_seeded(g)
        theta = flatten_parameters(net)
        epochs = torch.cat([theta[None], theta + (0.02 * torch.randn(3, theta.numel(), generator=g)).cumsum(0)])
        trajectories.append(ExpertTrajectory(epochs, [n for n, _ in net.named_parameters()],
                                             [tuple(p.shape) for p in net.parameters()], {}))
    return spec, trajectories, MTT(spec, trajectories, syn_steps=3, student_lr=0.05, image_grad_scale=scale)


def test_truncated_mtt_image_gradient_is_exactly_half_in_compat_mode():
    images = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    results = {}
    for scale in (1.0, 0.5):
        _, _, mtt = _toy_mtt(scale)
        loss, grad = mtt.image_gradient(images, labels, StepContext(real=None, seed=3))
        results[scale] = (loss, grad, mtt.student_lr.grad.clone())
    (loss, grad, lr_grad), (loss_c, grad_c, lr_grad_c) = results[1.0], results[0.5]
    assert grad.abs().sum() > 0
    assert torch.equal(grad_c, 0.5 * grad)                       # the image gradient, halved exactly
    assert torch.equal(loss_c, loss) and torch.equal(lr_grad_c, lr_grad)  # the loss and dL/dalpha are not


def test_setup_passes_the_half_gradient_and_its_lr_only_in_compat_mode(monkeypatch):
    spec, trajectories, _ = _toy_mtt(1.0)
    monkeypatch.setattr("ld3m_fast.distill.buffers.load_buffer", lambda path, expect=None: trajectories)
    for compat, scale in ((False, 1.0), (True, 0.5)):
        config = DistillConfig(algorithm="mtt", buffer="unused", released_compat=compat)
        algorithm = build_algorithm_for(config, spec, trajectories)
        assert algorithm.image_grad_scale == scale
        # Without a preset: the released updates either way (500 on the full gradient, 1000 on the half).
        assert algorithm.default_lr_latent == algorithm.default_lr_class == 500.0 / scale
    with pytest.raises(LD3MError, match="--mtt-gradient full has no released counterpart"):
        DistillConfig(algorithm="mtt", buffer="b", mtt_gradient="full", released_compat=True,
                      prior="p", iterations=1, batch_real=1).validate()


def test_mtt_presets_give_the_released_lr_on_the_released_half_gradient():
    needs = {"data": "/d", "subset": "imagenet-a", "prior": "/p", "buffer": "/b"}
    default = with_preset({"preset": "ld3m-mtt-128-ipc1", **needs})
    compat = with_preset({"preset": "ld3m-mtt-128-ipc1", "released_compat": True, **needs})
    assert (default["lr_latent"], default["lr_class"]) == (500.0, 500.0)
    assert (compat["lr_latent"], compat["lr_class"]) == (1000.0, 1000.0)
    assert with_preset({"preset": "ld3m-mtt-128-ipc1", "released_compat": True, "lr_latent": 7.0,
                        **needs})["lr_latent"] == 7.0  # a flag still wins
    dm = {"preset": "ld3m-dm-128-ipc1", "data": "/d", "subset": "imagenet-a", "prior": "/p"}
    assert with_preset({**dm, "released_compat": True})["lr_latent"] == with_preset(dm)["lr_latent"] == 1.0


# --------------------------------------------------------------------------- the switch

def test_the_default_is_off_and_changes_nothing():
    from ld3m_fast.priors import build_tiny_prior

    prior = build_tiny_prior()

    def released_options(**settings):
        options = generator_options(DistillConfig(**settings), prior, prior.image_size)
        return {k: options[k] for k in ("spacing", "clamp", "checkpoint_attention") if k in options}

    config = DistillConfig()
    assert config.released_compat is False and released_options() == {"checkpoint_attention": False}
    assert released_options(released_compat=True) == {"spacing": "released", "clamp": True,
                                                      "checkpoint_attention": False}
    assert released_options(released_compat=True, grad_mode="released") == \
        {"spacing": "released", "clamp": True, "checkpoint_attention": True}
    assert released_options(grad_mode="released", checkpoint_attention="on") == {"checkpoint_attention": True}


def test_cli_accepts_records_and_refuses_released_compat(tmp_path, capsys):
    ws = make_workspace(tmp_path / "ws")
    code, _, err = run_cli(distill_flags(ws, tmp_path / "bad", "--released-compat", "--steps", "3"), capsys)
    assert_one_line_error(code, err, "--released-compat", "--steps 3", "use --steps 2 or 4")
    assert not (tmp_path / "bad").exists()

    run = tmp_path / "compat"
    code, _, err = run_cli(distill_flags(ws, run, "--released-compat", "--steps", "6"), capsys)
    assert code == 0, err
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["released_compat"] is True and recorded["steps"] == 6

    plain = tmp_path / "plain"
    code, _, err = run_cli(distill_flags(ws, plain), capsys)
    assert code == 0, err
    assert json.loads((plain / "config.json").read_text())["released_compat"] is False
    code, _, err = run_cli(["distill", "--resume", plain, "--released-compat", "--iterations", 2,
                            "--no-progress"], capsys)
    assert_one_line_error(code, err, "cannot change released_compat")
