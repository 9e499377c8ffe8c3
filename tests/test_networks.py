"""Networks: pinned parameter counts, shapes, embed/forward contract, functional_call, norms."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from ld3m_fast.errors import LD3MError
from ld3m_fast.networks import (
    ARCHITECTURES,
    SMALL_FORM_BELOW,
    ViT,
    build_network,
    count_parameters,
    default_convnet_depth,
    network_form,
    parse_arch,
    vit_patch_size,
)

# 10 classes, 128x128, the released definitions (issue 3).
PINNED_COUNTS = {
    "convnet": 615_690,
    "resnet18": 11_173_962,
    "vgg11": 9_476_874,
    "alexnet": 2_333_002,
    "vit": 16_176_650,
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_counts_are_pinned(arch):
    net = build_network(arch, num_classes=10, res=128)
    assert count_parameters(net) == PINNED_COUNTS[arch]


def test_convnet_depth_5_width_128_layout():
    net = build_network("convnet", num_classes=10, res=128, depth=5, width=128, norm="instance")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 5 and all(m.num_groups == m.num_channels == 128 for m in norms)
    assert net.head.in_features == 128 * 4 * 4
    assert count_parameters(build_network("convnet", num_classes=10, res=128, norm="none")) == \
        615_690 - 5 * 2 * 128


@pytest.mark.parametrize("res", [32, 128])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_and_embed_shapes(arch, res):
    torch.manual_seed(0)
    net = build_network(arch, num_classes=7, res=res)
    x = torch.randn(2, 3, res, res)
    logits = net(x)
    features = net.embed(x)
    assert logits.shape == (2, 7)
    assert features.shape == (2, net.feature_dim)
    assert torch.allclose(logits, net.head(features), atol=1e-6)
    assert torch.isfinite(logits).all()


def test_convnet_head_follows_res_and_depth():
    assert default_convnet_depth(32) == 3
    assert default_convnet_depth(28) == 3
    assert default_convnet_depth(64) == 4
    assert default_convnet_depth(128) == 5
    assert default_convnet_depth(256) == 6
    assert default_convnet_depth(512) == 6
    net = build_network("convnet", num_classes=10, res=28)  # depth 3: 28 -> 14 -> 7 -> 3
    assert net.head.in_features == 128 * 3 * 3
    assert net(torch.randn(1, 3, 28, 28)).shape == (1, 10)
    net = build_network("convnet", num_classes=10, channels=1, res=32, width=64, depth=4)
    assert net.head.in_features == 64 * 2 * 2
    assert net(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    assert build_network("ConvNet-D3", num_classes=10, res=32).head.in_features == 128 * 16
    assert build_network("convnetd6", num_classes=10, res=256).head.in_features == 128 * 16


def test_functional_call_matches_module_and_substitutes_parameters():
    torch.manual_seed(0)
    net = build_network("convnet", num_classes=10, res=32)
    x = torch.randn(4, 3, 32, 32)
    params = {name: p.detach().clone() for name, p in net.named_parameters()}
    assert torch.allclose(functional_call(net, params, (x,)), net(x), atol=1e-6)
    # Substituted parameters are used (and stay differentiable), the module's are untouched.
    shifted = {name: (p + 0.01).requires_grad_() for name, p in params.items()}
    reference = build_network("convnet", num_classes=10, res=32)
    reference.load_state_dict({k: v.detach() for k, v in shifted.items()})
    out = functional_call(net, shifted, (x,))
    assert torch.allclose(out, reference(x), atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), list(shifted.values()))
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.equal(net.head.weight, params["head.weight"])


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
def test_functional_call_other_architectures(arch):
    torch.manual_seed(1)
    net = build_network(arch, num_classes=5, res=32)
    x = torch.randn(2, 3, 32, 32)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    assert torch.allclose(functional_call(net, state, (x,)), net(x), atol=1e-5)


def test_embed_through_functional_call():
    net = build_network("convnet", num_classes=10, res=32)
    params = dict(net.named_parameters())
    x = torch.randn(2, 3, 32, 32)

    class EmbedOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner.embed(images)

    wrapped = EmbedOnly(net)
    out = functional_call(wrapped, {f"inner.{k}": v for k, v in params.items()}, (x,))
    assert torch.allclose(out, net.embed(x), atol=1e-6)


def test_instance_norm_is_per_sample():
    # Per-sample norm makes micro-batching exact: a sample's output ignores its batch mates.
    torch.manual_seed(0)
    net = build_network("convnet", num_classes=10, res=32)
    x = torch.randn(6, 3, 32, 32)
    assert torch.allclose(net(x)[:2], net(x[:2]), atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "layer", "none", "instance"])
def test_norm_choices_build(norm):
    net = build_network("vgg11", num_classes=10, res=32, norm=norm)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_network("alexnet", num_classes=10, res=32, norm=norm)(
        torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unknown_norm_and_arch_are_rejected():
    with pytest.raises(ValueError, match="unknown norm 'instancenorm'.*instance, batch, layer, none"):
        build_network("convnet", num_classes=10, res=32, norm="instancenorm")
    with pytest.raises(LD3MError, match="unknown norm"):
        build_network("resnet18", num_classes=10, res=32, norm="group")
    with pytest.raises(ValueError, match="unknown norm 'instance'.*none, layer"):
        build_network("vit", num_classes=10, res=32, norm="instance")
    with pytest.raises(ValueError, match="unknown architecture 'resnet50'"):
        build_network("resnet50", num_classes=10, res=32)
    with pytest.raises(ValueError, match="divisible by its patch size 16"):
        ViT(10, 3, 40)  # an explicit patch must divide the image; build_network picks one that does
    with pytest.raises(LD3MError, match="unknown network form 'cifar'"):
        build_network("vgg11", num_classes=10, res=32, form="cifar")
    with pytest.raises(ValueError, match="does not fit resolution"):
        build_network("convnet", num_classes=10, res=32, depth=6)


def test_arch_name_spellings():
    assert parse_arch("ResNet-18") == ("resnet18", None)
    assert parse_arch("VGG_11") == ("vgg11", None)
    assert parse_arch("ConvNetD4") == ("convnet", 4)
    assert parse_arch("ViT") == ("vit", None)


@pytest.mark.parametrize("res, depth", [(128, 10), (32, 6)])  # the full form, the small form
def test_vit_layer_norm_variant_and_released_default(res, depth):
    released = build_network("vit", num_classes=10, res=res)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in released.modules())
    assert len(released.blocks) == depth
    with_layer_norm = build_network("vit", num_classes=10, res=res, norm="layer")
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in with_layer_norm.modules()) == 2 * depth + 1
    assert with_layer_norm(torch.randn(2, 3, res, res)).shape == (2, 10)


# ----------------------------------------------------------------------------- small-resolution forms

def test_form_follows_resolution_and_can_be_forced():
    assert network_form(SMALL_FORM_BELOW - 1) == "small" and network_form(SMALL_FORM_BELOW) == "full"
    assert network_form(32, "full") == "full" and network_form(256, "small") == "small"
    # the pinned 128x128 counts are the full forms (test_parameter_counts_are_pinned); forcing
    # the full form at 128 changes nothing
    for arch in ARCHITECTURES:
        assert count_parameters(build_network(arch, num_classes=10, res=128, form="full")) == PINNED_COUNTS[arch]


def test_small_vgg11_is_the_released_cifar_head():
    small = build_network("vgg11", num_classes=10, res=32)
    assert small.head.in_features == 512
    assert not any(isinstance(m, torch.nn.AdaptiveMaxPool2d) for m in small.modules())
    # the same convs as the 128-sized form; the head reads 512 features instead of 512*7*7
    assert count_parameters(small) == PINNED_COUNTS["vgg11"] - (512 * 7 * 7 - 512) * 10
    full = build_network("vgg11", num_classes=10, res=32, form="full")
    assert full.head.in_features == 512 * 7 * 7
    assert build_network("vgg11", num_classes=10, res=64).head.in_features == 512 * 2 * 2


def test_vit_patch_size_leaves_at_least_an_8x8_grid_where_it_can():
    assert [vit_patch_size(r) for r in (8, 12, 16, 24, 28, 32, 40, 64, 128, 132, 256, 512)] == \
        [1, 1, 2, 3, 2, 4, 5, 8, 16, 12, 16, 16]
    for res in range(8, 300, 4):
        patch = vit_patch_size(res)
        assert res % patch == 0 and patch <= 16
        assert res // patch >= 8 or patch == 1


@pytest.mark.parametrize("res", [8, 12, 16, 20, 24, 28, 40, 48, 64, 96])
def test_every_architecture_builds_at_small_resolutions(res):
    # Every side a prior with latent factor 4 gives (>= 8): each network builds and runs.
    torch.manual_seed(0)
    x = torch.randn(1, 3, res, res)
    for arch in ARCHITECTURES:
        net = build_network(arch, num_classes=3, res=res)
        logits = net(x)
        assert logits.shape == (1, 3) and torch.isfinite(logits).all(), (arch, res)
