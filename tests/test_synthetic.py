"""The learnable synthetic set: initialisation from real images, save and load."""
import pytest
import torch

from ld3m_fast import LD3MError, SyntheticSet, build_tiny_prior
from ld3m_fast.normalization import uint8_to_autoencoder


def _real(num_classes=3, per_class=4, size=32):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_classes * per_class, 3, size, size), generator=g,
                           dtype=torch.uint8)
    labels = torch.arange(num_classes).repeat(per_class)
    return images, labels


def test_from_real_encodes_real_images_of_each_class():
    prior = build_tiny_prior(num_classes=5)
    images, labels = _real()
    syn = SyntheticSet.from_real(prior, images, labels, ipc=2,
                                 generator=torch.Generator().manual_seed(1), prior_classes=[4, 0, 2])
    assert syn.Z.shape == (6, 3, 8, 8) and syn.c.shape == (6, prior.embedding_dim)
    assert syn.labels.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(syn.c[0], prior.class_table[4])
    torch.testing.assert_close(syn.c[2], prior.class_table[0])
    # every Z is the encoding (in [-1, 1]) of a real image of its class
    with torch.no_grad():
        encoded = prior.encode(uint8_to_autoencoder(images))
    for i, label in enumerate(syn.labels.tolist()):
        distances = (encoded[labels == label] - syn.Z[i].detach()).flatten(1).abs().amax(1)
        assert distances.min() < 1e-5


def test_selection_follows_the_generator():
    prior = build_tiny_prior()
    images, labels = _real()
    make = lambda seed: SyntheticSet.from_real(prior, images, labels, 2, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(make(3).Z, make(3).Z)
    assert not torch.equal(make(3).Z, make(4).Z)


def test_too_few_images_is_a_user_error():
    prior = build_tiny_prior()
    images, labels = _real(per_class=2)
    with pytest.raises(LD3MError, match="fewer than --ipc 3"):
        SyntheticSet.from_real(prior, images, labels, 3, torch.Generator())


def test_resizes_to_the_prior_size():
    prior = build_tiny_prior()
    images, labels = _real(size=28)
    syn = SyntheticSet.from_real(prior, images, labels, 1, torch.Generator())
    assert syn.Z.shape == (3, 3, 8, 8)


def test_save_load_round_trip(tmp_path):
    prior = build_tiny_prior()
    images, labels = _real()
    syn = SyntheticSet.from_real(prior, images, labels, 2, torch.Generator(), prior_classes=[1, 2, 3])
    syn.save(tmp_path / "syn.safetensors", metadata={"steps": 10, "skip": "x0"})
    loaded = SyntheticSet.load(tmp_path / "syn.safetensors")
    assert torch.equal(loaded.Z, syn.Z) and torch.equal(loaded.c, syn.c)
    assert torch.equal(loaded.labels, syn.labels) and loaded.prior_classes == [1, 2, 3]
    meta = SyntheticSet.read_metadata(tmp_path / "syn.safetensors")
    assert meta["steps"] == 10 and meta["skip"] == "x0"
    assert [p.name for p in tmp_path.iterdir()] == ["syn.safetensors"]


def test_load_errors(tmp_path):
    with pytest.raises(LD3MError, match="does not exist"):
        SyntheticSet.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(LD3MError, match="cannot read"):
        SyntheticSet.load(tmp_path / "bad.safetensors")
