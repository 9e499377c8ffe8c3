"""The LD3M chain against the SPEC equations, and its three gradient modes."""
import math

import pytest
import torch

from ld3m_fast import ChainNoise, ChainSchedule, LD3MGenerator, build_tiny_prior
from ld3m_fast.normalization import from_autoencoder


@pytest.fixture(scope="module")
def prior64():
    return build_tiny_prior("unet-cond", "vq", seed=0).double()


def spec_chain(prior, Z, c, start_noise, step_noise, *, steps, guidance, skip, eta):
    """SPEC §1 written out literally, one denoiser call per pass (no batching)."""
    abar = prior.alphas_cumprod.tolist()
    stride = 1000 // steps
    timesteps = [1 + i * stride for i in range(steps)]
    z_T = math.sqrt(abar[timesteps[-1]]) * Z + math.sqrt(1 - abar[timesteps[-1]]) * start_noise
    anchor_x0 = prior.anchor(Z)
    null = prior.class_table[prior.null_index].expand_as(c)
    z = z_T
    for visit, k in enumerate(range(steps - 1, -1, -1)):
        t = timesteps[k]
        a_t = abar[t]
        a_prev = abar[timesteps[k - 1]] if k > 0 else abar[0]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        tt = torch.full((Z.shape[0],), t)
        eps = prior.eps(z, tt, c)
        if guidance != 1.0:
            eps_null = prior.eps(z, tt, null)
            eps = eps_null + guidance * (eps - eps_null)
        x0 = (z - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if skip == "x0":
            w = k / max(steps - 1, 1)
            x0 = (1 - w) * x0 + w * anchor_x0
        mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if skip == "mean":
            w = (k + 1) / steps  # the paper's t/T, t = T ... 1
            mu = (1 - w) * mu + w * z_T
        z = mu + (sigma * step_noise[visit] if sigma > 0 else 0.0)
    return from_autoencoder(prior.decode(z))


def _inputs(prior, batch=3, seed=0):
    """Latents and class embeddings in the prior's dtype."""
    dtype = prior.class_table.dtype
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(batch, *prior.latent_shape(), generator=g, dtype=torch.float64).to(dtype)
    c = prior.class_table[torch.arange(batch) % prior.num_classes].clone()
    return Z, c


@pytest.mark.parametrize("skip", ["x0", "mean", None])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_chain_matches_spec_equations(prior64, skip, eta, guidance):
    Z, c = _inputs(prior64)
    gen = LD3MGenerator(prior64, steps=5, guidance=guidance, skip=skip, eta=eta,
                        grad_mode="autograd")
    noise = gen.draw_noise(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours = gen(Z, c, noise)
        expected = spec_chain(prior64, Z, c, noise.start, noise.steps, steps=5,
                              guidance=guidance, skip=skip, eta=eta)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("skip", ["x0", "mean", None])
def test_single_step_chain(prior64, skip):
    Z, c = _inputs(prior64)
    gen = LD3MGenerator(prior64, steps=1, skip=skip, grad_mode="autograd")
    noise = gen.draw_noise(3, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert gen.schedule.timesteps == (1,)
    with torch.no_grad():
        expected = spec_chain(prior64, Z, c, noise.start, None, steps=1, guidance=3.0,
                              skip=skip, eta=0.0)
        torch.testing.assert_close(gen(Z, c, noise), expected, rtol=1e-9, atol=1e-9)


def test_schedule_as_released():
    prior = build_tiny_prior()
    s = ChainSchedule.build(prior.alphas_cumprod, 10, skip="x0")
    assert s.timesteps == (901, 801, 701, 601, 501, 401, 301, 201, 101, 1)
    abar = prior.alphas_cumprod
    assert s.a_t[0] == pytest.approx(abar[901].item()) and s.a_start == s.a_t[0]
    assert s.a_prev[-1] == pytest.approx(abar[0].item())  # not 1, as released
    assert s.a_prev[0] == pytest.approx(abar[801].item())
    assert s.skip_weight[0] == 1.0 and s.skip_weight[-1] == 0.0
    mean = ChainSchedule.build(prior.alphas_cumprod, 10, skip="mean")
    assert mean.skip_weight[0] == 1.0 and mean.skip_weight[-1] == pytest.approx(0.1)
    assert ChainSchedule.build(prior.alphas_cumprod, 30).timesteps[0] == 1 + 29 * 33
    assert all(sig == 0 for sig in s.sigma)


def _gradients(gen, Z, c, noise, weights):
    Z = Z.clone().requires_grad_()
    c = c.clone().requires_grad_()
    images = gen(Z, c, noise)
    (images * weights).sum().backward()
    return images.detach(), Z.grad, c.grad


@pytest.mark.parametrize("denoiser,autoencoder", [("unet-cond", "vq"), ("unet", "kl"), ("dit", "vq")])
@pytest.mark.parametrize("skip,eta", [("x0", 0.0), ("mean", 0.5), (None, 0.0)])
def test_gradient_modes_agree(denoiser, autoencoder, skip, eta):
    prior = build_tiny_prior(denoiser, autoencoder, seed=3).double()
    Z, c = _inputs(prior, batch=5)
    results = {}
    for mode in ("autograd", "released", "recompute"):
        gen = LD3MGenerator(prior, steps=3, skip=skip, eta=eta, grad_mode=mode,
                            chunk_size=None if mode == "autograd" else 2)
        noise = gen.draw_noise(5, torch.Generator().manual_seed(7), dtype=torch.float64)
        weights = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(8),
                              dtype=torch.float64)
        results[mode] = _gradients(gen, Z, c, noise, weights)
    images, grad_Z, grad_c = results["autograd"]
    assert grad_Z.abs().sum() > 0 and grad_c.abs().sum() > 0, "gradients must reach Z and c"
    for mode in ("released", "recompute"):
        torch.testing.assert_close(results[mode][0], images, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(results[mode][1], grad_Z, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(results[mode][2], grad_c, rtol=1e-8, atol=1e-10)


class _CountingDenoiser(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.forward_calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def eps(self, z_t, t, cond):
        self.forward_calls += 1
        return self.inner.eps(z_t, t, cond)


@pytest.mark.parametrize("mode,calls_per_step", [("autograd", 1), ("recompute", 2), ("released", 3)])
def test_denoiser_forwards_per_step(mode, calls_per_step):
    """recompute: 2 forwards + 1 backward per step; released: 3 + 1 (checkpointed re-render)."""
    prior = build_tiny_prior()
    counter = _CountingDenoiser(prior.denoiser)
    prior.denoiser = counter
    gen = LD3MGenerator(prior, steps=4, grad_mode=mode)
    Z, c = _inputs(prior, batch=2)
    noise = gen.draw_noise(2, torch.Generator().manual_seed(0))
    _gradients(gen, Z, c, noise, torch.ones(2, 3, 32, 32))
    assert counter.forward_calls == calls_per_step * 4


def test_skip_keeps_gradient_alive_at_fifty_steps():
    """Paper Table 1: without the skip, ||dL/dZ|| shrinks with T; the skip keeps it large."""
    prior = build_tiny_prior(seed=1)
    Z, c = _inputs(prior, batch=2)
    norms = {}
    for skip in ("x0", None):
        gen = LD3MGenerator(prior, steps=50, skip=skip, grad_mode="recompute")
        noise = gen.draw_noise(2, torch.Generator().manual_seed(0))
        Zl = Z.clone().requires_grad_()
        images = gen(Zl, c, noise)
        images.square().mean().backward()
        norms[skip] = Zl.grad.norm().item()
    print(f"\n||dL/dZ|| at T=50: skip=x0 {norms['x0']:.4e}, skip=None {norms[None]:.4e}, "
          f"ratio {norms['x0'] / norms[None]:.2f}")
    assert norms["x0"] > norms[None]


def test_same_seed_same_images_new_noise_new_images():
    prior = build_tiny_prior()
    Z, c = _inputs(prior, batch=2)
    gen = LD3MGenerator(prior, steps=3, eta=0.3)
    first = gen(Z, c, gen.draw_noise(2, torch.Generator().manual_seed(5)))
    again = gen(Z, c, gen.draw_noise(2, torch.Generator().manual_seed(5)))
    other = gen(Z, c, gen.draw_noise(2, torch.Generator().manual_seed(6)))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_noise_is_reused_not_redrawn():
    """The released code redrew the start noise on every call; ours is explicit state."""
    prior = build_tiny_prior()
    gen = LD3MGenerator(prior, steps=2)
    Z, c = _inputs(prior, batch=2)
    noise = gen.draw_noise(2, torch.Generator().manual_seed(0))
    assert torch.equal(gen(Z, c, noise), gen(Z, c, noise))


def test_output_size_and_normalisation():
    prior = build_tiny_prior()
    gen = LD3MGenerator(prior, steps=2, output_size=48)
    Z, c = _inputs(prior, batch=2)
    images = gen(Z, c, gen.draw_noise(2, torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 48, 48)


def test_bad_arguments():
    prior = build_tiny_prior()
    with pytest.raises(ValueError, match="grad_mode"):
        LD3MGenerator(prior, grad_mode="magic")
    with pytest.raises(ValueError, match="skip"):
        LD3MGenerator(prior, skip="sideways")
    gen = LD3MGenerator(prior, steps=2, eta=0.5)
    Z, c = _inputs(prior, batch=2)
    with pytest.raises(ValueError, match="per-step noise"):
        gen(Z, c, ChainNoise(torch.randn(2, 3, 8, 8)))


def test_gradient_modes_agree_under_bf16_autocast():
    """Backward re-renders under the caller's autocast state (as torch.utils.checkpoint does)."""
    prior = build_tiny_prior()
    Z, c = _inputs(prior, batch=3)
    grads = {}
    for mode in ("autograd", "released", "recompute"):
        gen = LD3MGenerator(prior, steps=3, grad_mode=mode, chunk_size=2)
        noise = gen.draw_noise(3, torch.Generator().manual_seed(0))
        Z_leaf = Z.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            images = gen(Z_leaf, c, noise)
        assert images.dtype == torch.bfloat16
        images.float().square().mean().backward()
        assert Z_leaf.grad.dtype == torch.float32  # the chain state stays in Z's dtype
        grads[mode] = Z_leaf.grad
    torch.testing.assert_close(grads["released"], grads["autograd"], rtol=0, atol=0)
    torch.testing.assert_close(grads["recompute"], grads["autograd"], rtol=0, atol=0)
