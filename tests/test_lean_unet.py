"""The lean UNet2DModel forward (`ld3m_fast.priors.lean_unet`) against diffusers' own forward.

The reference is `model(sample, t, class_labels=c).sample`; the lean forward calls the same ops
in the same order, so outputs and gradients must be bit-identical (torch.equal, not a
tolerance). Models it does not reproduce must be refused, and the adapter must then fall back.
"""
import pytest
import torch

from ld3m_fast import LD3MGenerator, build_tiny_prior
from ld3m_fast.priors.adapters import ClassEmbeddingDenoiser
from ld3m_fast.priors.default import load_default_prior
from ld3m_fast.priors.lean_unet import lean_unet2d_forward, why_not_lean


def _reference(model, z, t, c):
    return model(z, t, class_labels=c).sample


def _inputs(prior, batch, generator, dtype=torch.float32):
    z = torch.randn(batch, *prior.latent_shape(), generator=generator, dtype=dtype)
    t = torch.randint(1, 1000, (batch,), generator=generator)
    c = torch.randn(batch, prior.embedding_dim, generator=generator, dtype=dtype)
    return z, t, c


def _assert_identical(model, z, t, c):
    """Forward and backward (to the sample and the class vectors) bit for bit."""
    assert torch.equal(lean_unet2d_forward(model, z, t, c), _reference(model, z, t, c))
    grads = []
    for forward in (lean_unet2d_forward, _reference):
        z_in, c_in = z.clone().requires_grad_(), c.clone().requires_grad_()
        out = forward(model, z_in, t, c_in)
        upstream = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
        grads.append(torch.autograd.grad(out, (z_in, c_in), upstream))
    for lean, reference in zip(*grads):
        assert torch.equal(lean, reference)


@pytest.fixture(scope="module")
def shipped():
    return load_default_prior()


@pytest.mark.parametrize("batch", [1, 3, 10])
def test_shipped_prior_bit_identical(shipped, batch):
    model = shipped.denoiser.model
    assert why_not_lean(model) is None
    _assert_identical(model, *_inputs(shipped, batch, torch.Generator().manual_seed(batch)))


def test_tiny_prior_bit_identical_float64():
    prior = build_tiny_prior("unet", "kl", seed=3).double()
    model = prior.denoiser.model
    assert why_not_lean(model) is None
    _assert_identical(model, *_inputs(prior, 2, torch.Generator().manual_seed(0), torch.float64))


def test_scalar_timestep(shipped):
    model = shipped.denoiser.model
    z, _, c = _inputs(shipped, 2, torch.Generator().manual_seed(1))
    t = torch.tensor(321)
    assert torch.equal(lean_unet2d_forward(model, z, t, c), _reference(model, z, t, c))


def test_adapter_uses_it_and_falls_back(monkeypatch):
    prior = build_tiny_prior("unet", "vq", seed=1)
    adapter = prior.denoiser
    assert isinstance(adapter, ClassEmbeddingDenoiser) and adapter._lean_applies()
    z, t, c = _inputs(prior, 2, torch.Generator().manual_seed(2))
    lean = prior.eps(z, t, c)
    monkeypatch.setattr(adapter, "lean_forward", False)
    assert torch.equal(lean, prior.eps(z, t, c))
    monkeypatch.setattr(adapter, "lean_forward", True)
    adapter.model.train()  # set behind the Prior's back: dropout and friends would matter
    assert not adapter._lean_applies()
    adapter.model.eval()
    assert adapter._lean_applies()
    handle = adapter.model.mid_block.register_forward_hook(lambda *a: None)
    adapter.recheck_lean()
    assert not adapter._lean_applies()
    handle.remove()
    adapter.recheck_lean()
    assert adapter._lean_applies()


def test_refused_models():
    assert why_not_lean(build_tiny_prior("unet-cond", "kl").denoiser.model) is not None
    assert why_not_lean(build_tiny_prior("dit", "kl").denoiser.model) is not None
    model = build_tiny_prior("unet", "kl").denoiser.model
    handle = model.down_blocks[0].resnets[0].register_forward_hook(lambda *a: None)
    assert "hook" in why_not_lean(model)
    handle.remove()
    assert why_not_lean(model) is None
    model.train()
    assert why_not_lean(model) == "training mode"
    model.eval()
    model.enable_gradient_checkpointing()
    assert why_not_lean(model) == "gradient checkpointing"


def test_compiled_model_keeps_its_compiled_call():
    prior = build_tiny_prior("unet", "kl")
    prior.denoiser.model.compile(backend="eager")  # nothing compiles until it is called
    assert not prior.denoiser._lean_applies()


def test_generator_gradients_unchanged(monkeypatch):
    """The chain (recompute mode, guidance 3) gives the same images and gradients either way."""
    prior = build_tiny_prior("unet", "kl", seed=4)
    gen = LD3MGenerator(prior, steps=3, guidance=3.0)
    g = torch.Generator().manual_seed(5)
    Z = torch.randn(2, *prior.latent_shape(), generator=g)
    c = prior.class_table[:2].clone()
    noise = gen.draw_noise(2, torch.Generator().manual_seed(6))
    upstream = torch.randn(2, 3, 32, 32, generator=g)
    results = []
    for lean in (True, False):
        monkeypatch.setattr(prior.denoiser, "lean_forward", lean)
        Z_in, c_in = Z.clone().requires_grad_(), c.clone().requires_grad_()
        images = gen(Z_in, c_in, noise)
        results.append((images.detach(), *torch.autograd.grad(images, (Z_in, c_in), upstream)))
    for lean, reference in zip(*results):
        assert torch.equal(lean, reference)


def test_bit_identical_under_bf16_autocast(shipped):
    """Autocast casts at the ops, so the lean forward sees the same casts as diffusers' modules."""
    model = shipped.denoiser.model
    z, t, c = _inputs(shipped, 2, torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean, reference = lean_unet2d_forward(model, z, t, c), _reference(model, z, t, c)
    assert lean.dtype == reference.dtype and torch.equal(lean, reference)
