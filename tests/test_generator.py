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


# Every "recompute" knob: (chunk, decoder_chunk, store_steps, sac_min_flops); batch 3 so that
# chunks of 2 and decoder pieces of 2 leave a smaller last piece.
RECOMPUTE_VARIANTS = [
    (2, 1, 0, None),      # pure recompute, the decoder one image at a time
    (2, None, 1, None),   # the last step's whole graph kept
    (3, 2, "T", None),    # every step's graph kept (1 forward + 1 backward per step)
    (2, 2, 2, 0.0),       # selective: every matmul/conv/attention output kept
    (None, 2, "T", 600.0),  # selective: only the costlier ops kept
    (2, None, 1, 1e12),   # selective, nothing qualifies: everything recomputed
]


@pytest.mark.parametrize("skip,eta,guidance,steps", [
    ("x0", 0.0, 3.0, 3), ("mean", 0.5, 1.0, 2), (None, 0.3, 3.0, 2), ("x0", 0.0, 1.0, 1),
    (None, 0.0, 3.0, 1)])
def test_store_and_decoder_knobs_give_the_autograd_gradients(prior64, skip, eta, guidance, steps):
    """float64: every store_steps / sac_min_flops / decoder_chunk setting equals one autograd graph."""
    prior = prior64
    Z, c = _inputs(prior, batch=3)
    weights = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def run(**kwargs):
        gen = LD3MGenerator(prior, steps=steps, skip=skip, eta=eta, guidance=guidance, **kwargs)
        noise = gen.draw_noise(3, torch.Generator().manual_seed(7), dtype=torch.float64)
        return _gradients(gen, Z, c, noise, weights)

    images, grad_Z, grad_c = run(grad_mode="autograd")
    assert grad_Z.abs().sum() > 0 and grad_c.abs().sum() > 0
    for chunk, decoder_chunk, store, sac in RECOMPUTE_VARIANTS:
        store = steps if store == "T" else min(store, steps)
        got = run(grad_mode="recompute", chunk_size=chunk, decoder_chunk=decoder_chunk,
                  store_steps=store, sac_min_flops=sac)
        label = f"chunk {chunk}, decoder {decoder_chunk}, store {store}, sac {sac}"
        torch.testing.assert_close(got[0], images, rtol=1e-10, atol=1e-10, msg=label)
        torch.testing.assert_close(got[1], grad_Z, rtol=1e-8, atol=1e-10, msg=label)
        torch.testing.assert_close(got[2], grad_c, rtol=1e-8, atol=1e-10, msg=label)


def test_stored_steps_cost_fewer_flops_and_keep_less_with_selection():
    """Counted on a real CPU run: each stored step saves one step forward (its graph, or its
    matmuls/convs/attention under selective checkpointing); selection keeps fewer bytes."""
    from ld3m_fast.distill.planner import measure

    prior = build_tiny_prior()
    Z, c = _inputs(prior, batch=4)
    steps = 3
    results = {}
    for name, kwargs in {"recompute": {}, "graph": dict(store_steps=steps),
                         "selective": dict(store_steps=steps, sac_min_flops=0.0),
                         "one step": dict(store_steps=1)}.items():
        gen = LD3MGenerator(prior, steps=steps, chunk_size=2, **kwargs)
        noise = gen.draw_noise(4, torch.Generator().manual_seed(0))
        results[name] = measure(lambda: _gradients(gen, Z, c, noise, torch.ones(4, 3, 32, 32)),
                                existing=(Z, c, noise.start))
    step = (results["recompute"].flops - results["graph"].flops) / steps
    assert step > 0
    # approx: the same matmuls, counted as mm or bmm depending on how the cond and null
    # calls are batched (selective checkpointing makes one call each).
    assert results["selective"].flops == pytest.approx(results["graph"].flops, rel=1e-3)
    assert results["one step"].flops == pytest.approx(results["recompute"].flops - step, rel=1e-3)
    assert results["selective"].peak_bytes < results["graph"].peak_bytes


def test_checkpoint_attention_runs_transformer_blocks_once_more_as_released(monkeypatch):
    """The released UNet checkpoints its transformer blocks inside: 4 block forwards per
    step in the released scheme instead of 3, the same gradients."""
    from diffusers.models.attention import BasicTransformerBlock

    calls = []
    forward = BasicTransformerBlock.forward

    def counted(self, *args, **kwargs):  # the class method: checkpoint's recompute skips module hooks
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(BasicTransformerBlock, "forward", counted)
    prior = build_tiny_prior("unet-cond", "vq", seed=3)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in prior.denoiser.modules())
    Z, c = _inputs(prior, batch=2)
    grads = {}
    for inside in (False, True):
        calls.clear()
        gen = LD3MGenerator(prior, steps=2, grad_mode="released", chunk_size=2,
                            checkpoint_attention=inside)
        noise = gen.draw_noise(2, torch.Generator().manual_seed(0))
        grads[inside] = _gradients(gen, Z, c, noise, torch.ones(2, 3, 32, 32))[1]
        assert len(calls) == (4 if inside else 3) * 2 * blocks
    assert not any(getattr(m, "gradient_checkpointing", False) for m in prior.denoiser.modules())
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


class _CountingDenoiser(torch.nn.Module):
    """Counts the images that pass through the denoiser."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def eps(self, z_t, t, cond):
        self.images += z_t.shape[0]
        return self.inner.eps(z_t, t, cond)


@pytest.mark.parametrize("mode,calls_per_step,store", [
    ("autograd", 1, 0), ("recompute", 2, 0), ("released", 3, 0), ("recompute", 1, 4),
    ("recompute", 1.5, 2)])
def test_denoiser_forwards_per_step(mode, calls_per_step, store):
    """Denoiser passes over the guided batch (2 x images) per step: recompute 2 forwards + 1
    backward; released 3 + 1 (checkpointed re-render); stored steps (whole graph) 1 + 1."""
    prior = build_tiny_prior()
    counter = _CountingDenoiser(prior.denoiser)
    prior.denoiser = counter
    gen = LD3MGenerator(prior, steps=4, grad_mode=mode, store_steps=store)
    Z, c = _inputs(prior, batch=2)
    noise = gen.draw_noise(2, torch.Generator().manual_seed(0))
    _gradients(gen, Z, c, noise, torch.ones(2, 3, 32, 32))
    assert counter.images == calls_per_step * 4 * 2 * 2


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
    with pytest.raises(ValueError, match="store_steps"):
        LD3MGenerator(prior, steps=2, store_steps=3)
    with pytest.raises(ValueError, match="recompute"):
        LD3MGenerator(prior, steps=2, grad_mode="released", store_steps=1)
    with pytest.raises(ValueError, match="decoder_chunk"):
        LD3MGenerator(prior, steps=2, decoder_chunk=0)
    gen = LD3MGenerator(prior, steps=2, eta=0.5)
    Z, c = _inputs(prior, batch=2)
    with pytest.raises(ValueError, match="per-step noise"):
        gen(Z, c, ChainNoise(torch.randn(2, 3, 8, 8)))


def test_gradient_modes_agree_under_bf16_autocast():
    """Backward re-renders under the caller's autocast state (as torch.utils.checkpoint does):
    bitwise equal where the same ops run on the same batches; selective checkpointing and
    decoder pieces (other batch shapes) within 2x the plain bf16 error of an fp32 run."""
    prior = build_tiny_prior()
    Z, c = _inputs(prior, batch=3)

    def grad(mode="recompute", autocast=True, **knobs):
        gen = LD3MGenerator(prior, steps=3, grad_mode=mode, chunk_size=2, **knobs)
        noise = gen.draw_noise(3, torch.Generator().manual_seed(0))
        Z_leaf = Z.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            images = gen(Z_leaf, c, noise)
        assert images.dtype == (torch.bfloat16 if autocast else torch.float32)
        images.float().square().mean().backward()
        assert Z_leaf.grad.dtype == torch.float32  # the chain state stays in Z's dtype
        return Z_leaf.grad

    plain = grad("autograd")
    for mode, knobs in (("released", {}), ("recompute", {}), ("recompute", dict(store_steps=2))):
        torch.testing.assert_close(grad(mode, **knobs), plain, rtol=0, atol=0, msg=f"{mode} {knobs}")
    exact = grad("autograd", autocast=False)
    plain_error = (plain - exact).abs().max()
    assert plain_error > 0
    for knobs in (dict(store_steps=2, sac_min_flops=0.0), dict(decoder_chunk=1)):
        error = (grad(**knobs) - exact).abs().max()
        assert error <= 2 * plain_error + 1e-6, f"{knobs}: {error:.3g} vs plain {plain_error:.3g}"
