"""Prior adapters, folders and their strict loading."""
import json

import pytest
import torch

from ld3m_fast import PriorError, build_tiny_prior, load_prior, save_prior

KINDS = [("unet-cond", "vq"), ("unet-cond", "kl"), ("unet", "vq"), ("unet", "kl"),
         ("dit", "vq"), ("dit", "kl")]


@pytest.mark.parametrize("denoiser,autoencoder", KINDS)
def test_interface_shapes(denoiser, autoencoder):
    prior = build_tiny_prior(denoiser, autoencoder, num_classes=7)
    assert prior.class_table.shape == (8, prior.embedding_dim) and prior.null_index == 7
    assert prior.latent_shape() == (3, 8, 8) and prior.latent_factor == 4
    z = torch.randn(2, 3, 8, 8)
    eps = prior.eps(z, torch.tensor([1, 901]), prior.class_table[:2])
    assert eps.shape == z.shape
    x = prior.decode(z)
    assert x.shape == (2, 3, 32, 32)
    assert prior.encode(x).shape == z.shape
    assert not any(p.requires_grad for p in prior.parameters())


def test_conditioning_vector_matters():
    prior = build_tiny_prior("unet", "vq")
    z = torch.randn(1, 3, 8, 8)
    t = torch.tensor([500])
    a = prior.eps(z, t, prior.class_table[:1])
    b = prior.eps(z, t, prior.class_table[1:2])
    assert not torch.allclose(a, b)


def test_vq_anchor_is_straight_through():
    prior = build_tiny_prior("unet-cond", "vq")
    Z = torch.randn(2, 3, 8, 8, requires_grad=True)
    anchor = prior.anchor(Z)
    codebook = prior.autoencoder.model.quantize.embedding.weight
    flat = anchor.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.cdist(flat.double(), codebook.double()).min(dim=1).values.max() < 1e-6  # on the codebook
    anchor.sum().backward()
    torch.testing.assert_close(Z.grad, torch.ones_like(Z))  # identity gradient


def test_kl_anchor_is_identity():
    prior = build_tiny_prior("unet-cond", "kl")
    Z = torch.randn(2, 3, 8, 8)
    assert prior.anchor(Z) is Z


@pytest.mark.parametrize("denoiser,autoencoder", KINDS)
def test_folder_round_trip(tmp_path, denoiser, autoencoder):
    prior = build_tiny_prior(denoiser, autoencoder, seed=2)
    save_prior(prior, tmp_path / "prior")
    loaded = load_prior(tmp_path / "prior")
    torch.testing.assert_close(loaded.class_table, prior.class_table, rtol=0, atol=0)
    torch.testing.assert_close(loaded.alphas_cumprod, prior.alphas_cumprod, rtol=0, atol=0)
    z = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 700])
    assert torch.equal(loaded.eps(z, t, prior.class_table[:2]), prior.eps(z, t, prior.class_table[:2]))
    assert torch.equal(loaded.decode(z), prior.decode(z))


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path):
    prior = build_tiny_prior()
    save_prior(prior, tmp_path / "p")
    save_prior(build_tiny_prior(seed=9), tmp_path / "p")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p"]
    assert torch.equal(load_prior(tmp_path / "p").class_table, build_tiny_prior(seed=9).class_table)


def test_weights_not_matching_config_is_an_error(tmp_path):
    save_prior(build_tiny_prior("unet-cond", "vq"), tmp_path / "p")
    config_path = tmp_path / "p" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["layers_per_block"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(PriorError, match=r"weights do not match config.json: \d+ missing"):
        load_prior(tmp_path / "p")


def test_autoencoder_shape_mismatch_is_an_error(tmp_path):
    save_prior(build_tiny_prior("unet", "kl"), tmp_path / "p")
    config_path = tmp_path / "p" / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16, 32, 48]
    config_path.write_text(json.dumps(config))
    with pytest.raises(PriorError, match="wrong shape"):
        load_prior(tmp_path / "p")


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(PriorError, match="does not exist"):
        load_prior(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorError, match="ld3m_prior.json is missing"):
        load_prior(tmp_path / "empty")


def test_missing_class_table(tmp_path):
    save_prior(build_tiny_prior("unet-cond", "vq"), tmp_path / "p")
    (tmp_path / "p" / "class_table.safetensors").unlink()
    with pytest.raises(PriorError, match="class_table"):
        load_prior(tmp_path / "p")


def test_prior_stays_in_eval_mode():
    prior = build_tiny_prior("dit", "vq")
    prior.train()
    assert not prior.training and not prior.denoiser.model.training
