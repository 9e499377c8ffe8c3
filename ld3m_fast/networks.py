"""The student / evaluation networks of the dataset-distillation literature.

`build_network(arch, num_classes=..., res=...)` builds one of

    convnet   width 128, depth 3-6: [conv3x3 -> norm -> ReLU -> avgpool 2x2] x depth -> linear
    resnet18  CIFAR-style stem (3x3 conv, stride 1, no max-pool), BasicBlocks [2, 2, 2, 2]
    vgg11     [64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M] -> adaptive max-pool 7x7
    alexnet   conv5x5(128) M conv5x5(192) M conv3x3(256, 192, 192) M -> linear, no norm
    vit       patch 16, dim 512, depth 10, 8 heads of 64, MLP 512, cls token, no LayerNorm

with the layer shapes of the released DC/DM/MTT/GLaD definitions, so parameter counts
match them exactly (10 classes, 128x128): ConvNet-D5-W128 615,690; ResNet-18 11,173,962;
VGG-11 9,476,874; AlexNet 2,333,002; ViT 16,176,650.

Small-resolution forms. Below 128x128 (`SMALL_FORM_BELOW`) the 128-sized VGG-11 stops
learning: its head adaptive-max-pools the 1x1 map of a 32x32 input up to 7x7 (49 copies of
one vector into a 25,088-input head) and trains to chance, real images included. The
released code evaluates 32x32 sets with `*_cifar` variants instead, and so do we, chosen
automatically by resolution (`network_form`; `form=` overrides):

    vgg11  small: the same convs, a max-pool only while the map is at least 2x2, the head
           on the flattened final map (512 inputs at 32x32, as the released VGG-11-CIFAR)
    vit    small: depth 6, as ViT-CIFAR (full: 10); both forms cut `vit_patch_size(res)`
           patches (16 at 128 and 256, 4 at 32 as ViT-CIFAR: at least an 8x8 grid of tokens).
           Without ViT-CIFAR's LayerNorms by default, like the full form (norm="layer" restores
           them): on 100 real Fashion-MNIST images at 32x32, 50 SGD steps (lr 0.01, batch 10),
           the small ViT reached 46% test accuracy without them and 22% with them
    resnet18  small: below 16x16 a stage downsamples only while its map is at least 4x4
           (else the last stage's per-sample norm runs on a 1x1 map and zeroes it); the same
           network at 16x16 and above
    convnet, alexnet: one form already fits every resolution (the depth follows res; a head
           sized from res), so "small" changes nothing

Every network is a plain `nn.Module` (usable with `torch.func.functional_call`) exposing
`embed(x) -> (B, F)` penultimate features (what DM matches) and `forward(x) -> (B, classes)`
logits = `head(embed(x))`. Inputs are (B, channels, res, res) in the shared normalisation.

Normalisation is an explicit choice: "instance" = GroupNorm(C, C, affine) (per-sample, the
literature's "instancenorm"), "batch" = BatchNorm2d, "layer" = GroupNorm(1, C, affine) (the
per-sample layer norm over C, H, W, without the resolution-dependent affine shape of
`nn.LayerNorm([C, H, W])`), "none". Anything else raises.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ld3m_fast.choices import NORMS
from ld3m_fast.errors import LD3MError

ARCHITECTURES = ("convnet", "resnet18", "vgg11", "alexnet", "vit")
# The released definitions: AlexNet has no normalisation, the ViT has its LayerNorms
# commented out; the others use instance norm.
DEFAULT_NORMS = {"convnet": "instance", "resnet18": "instance", "vgg11": "instance",
                 "alexnet": "none", "vit": "none"}
VIT_NORMS = ("none", "layer")
FORMS = ("full", "small")
# Below this side the small-resolution forms are used (the 128-sized forms are pinned above).
SMALL_FORM_BELOW = 128
SMALL_VIT_DEPTH = 6


class NetworkConfigError(LD3MError, ValueError):
    """An unknown architecture / norm or an unsupported resolution (a ValueError too)."""


def default_convnet_depth(res: int) -> int:
    """ConvNet depth of the literature for a resolution: 3 at 32, 4 at 64, 5 at 128, 6 at 256+."""
    return min(6, max(3, int(res).bit_length() - 3))


def check_norm(norm: str, allowed: tuple[str, ...] = NORMS) -> str:
    if norm not in allowed:
        raise NetworkConfigError(f"unknown norm {norm!r}: use one of {', '.join(allowed)}")
    return norm


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D normalisation layer over `channels` feature maps."""
    check_norm(norm)
    if norm == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    return nn.Identity()


def network_form(res: int, form: str | None = None) -> str:
    """"full" (the 128-sized definitions) at res >= 128, "small" below; `form` overrides."""
    if form is None:
        return "small" if res < SMALL_FORM_BELOW else "full"
    if form not in FORMS:
        raise NetworkConfigError(f"unknown network form {form!r}: use one of {', '.join(FORMS)}")
    return form


def vit_patch_size(res: int) -> int:
    """ViT patch side for a resolution: the largest divisor of res that is at most
    min(16, res // 8), so there are at least 8x8 tokens (16 at 128 and 256, 4 at 32, 3 at 24)."""
    limit = max(1, min(16, res // 8))
    return max(p for p in range(1, limit + 1) if res % p == 0)


def _halved(size: int, times: int) -> int:
    """Spatial size after `times` floor-halving 2x2 pools."""
    for _ in range(times):
        size //= 2
    return size


class ClassifierNet(nn.Module):
    """Base: subclasses define `embed`; `forward` applies the linear `head` to it."""

    head: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ----------------------------------------------------------------------------- ConvNet

class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling, stride 2, floor size (`nn.AvgPool2d(2)`), for NCHW tensors.

    x: (B, C, H, W) -> (B, C, H // 2, W // 2); an odd last row / column is dropped.
    PyTorch's NCHW `avg_pool2d` CPU kernel is not vectorised; two strided adds (column
    pairs, then row pairs) are 3.7x faster on a 640x128x32x32 batch (one thread, measured
    in benchmarks/bench_student.py). The sum order ((a + b) + (c + d)) / 4 differs from
    avg_pool2d's only by rounding. The backward spreads grad / 4 over each 2x2 window
    (one expand + copy) and is itself differentiable (DC and MTT take second derivatives).
    """

    @staticmethod
    def forward(x):
        batch, channels, height, width = x.shape
        h2, w2 = height // 2, width // 2
        if height % 2 or width % 2:
            x = x[:, :, : 2 * h2, : 2 * w2]
        pairs = x.reshape(batch * channels * 2 * h2, w2, 2)
        columns = (pairs[..., 0] + pairs[..., 1]).view(batch * channels * h2, 2, w2)
        return (columns[:, 0] + columns[:, 1]).mul_(0.25).view(batch, channels, h2, w2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.input_shape = inputs[0].shape

    @staticmethod
    def backward(ctx, grad):
        return _avg_pool_2x2_backward(grad, ctx.input_shape)


def _avg_pool_2x2_backward(grad: torch.Tensor, input_shape) -> torch.Tensor:
    batch, channels, h2, w2 = grad.shape
    spread = (grad * 0.25)[:, :, :, None, :, None].expand(batch, channels, h2, 2, w2, 2)
    spread = spread.reshape(batch, channels, 2 * h2, 2 * w2)
    height, width = input_shape[-2:]
    if height % 2 or width % 2:
        spread = F.pad(spread, (0, width % 2, 0, height % 2))
    return spread


class AvgPool2x2(nn.Module):
    """`nn.AvgPool2d(2)` with a faster NCHW CPU path (`_AvgPool2x2`); no parameters."""

    def forward(self, x):
        if x.dim() != 4 or not x.is_contiguous():
            return F.avg_pool2d(x, 2)  # channels-last and others: PyTorch's kernel is fast there
        return _AvgPool2x2.apply(x)


class ConvNet(ClassifierNet):
    """ConvNet-D{depth}-W{width}: (B, C, res, res) -> (B, width * (res / 2^depth)^2) features.

    The layers are the released ones (conv3x3 -> norm -> ReLU -> 2x2 average pool), with
    the parameter names of `nn.Sequential` (features.{4i}.weight, ...). Two changes that
    leave the function unchanged and are measured faster on CPU: the ReLU works in place
    (no norm's backward needs its output) and the pool is `AvgPool2x2`. The plain
    definition is `ld3m_fast.reference.convnet.ConvNetRef`, the oracle of the tests.
    """

    def __init__(self, num_classes: int, channels: int, res: int, width: int = 128,
                 depth: int = 5, norm: str = "instance"):
        super().__init__()
        if depth < 1 or _halved(res, depth) < 1:
            raise NetworkConfigError(f"ConvNet depth {depth} does not fit resolution {res}: "
                                     f"use depth 1..{max(1, res.bit_length() - 1)}")
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                       make_norm(norm, width), nn.ReLU(inplace=True), AvgPool2x2()]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * _halved(res, depth) ** 2, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


# ----------------------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                make_norm(norm, out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(ClassifierNet):
    """CIFAR-style ResNet-18 (3x3 stride-1 stem, no max-pool), global average pool -> 512.

    With `res` given (the small form), a stage downsamples only while its input map is at
    least 4x4: below 16x16 the last stage would otherwise run on a 1x1 map, where a
    per-sample norm subtracts each value from itself and the network outputs a constant.
    From 16x16 up (and with res=None) the strides are the released 1, 2, 2, 2; the
    parameter count never changes.
    """

    def __init__(self, num_classes: int, channels: int, norm: str = "instance", res: int | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False),
                                  make_norm(norm, 64), nn.ReLU())
        stages, in_channels, size = [], 64, res
        for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            if size is not None:
                stride = stride if size >= 4 else 1
                size = (size + 1) // stride if stride == 2 else size
            stages.append(nn.Sequential(BasicBlock(in_channels, out_channels, stride, norm),
                                        BasicBlock(out_channels, out_channels, 1, norm)))
            in_channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(512, num_classes)

    def embed(self, x):
        # Global average pooling keeps the head at 512 inputs for every resolution
        # (the released 128/256 variants pool adaptively too; the count pins it).
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


# ----------------------------------------------------------------------------- VGG-11

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(ClassifierNet):
    """VGG-11 with norm after every conv.

    small=False (the released 128/256 definition): the features end in an adaptive max-pool
    to 7x7 whatever the resolution (at 128 the 4x4 map is replicated up to 7x7), which gives
    the 512*7*7 = 25,088-input head of the pinned count. At 32x32 that head sees 49 copies of
    one 1x1 map and the network trains to chance.
    small=True (the released VGG-11-CIFAR, generalised): no adaptive pool, the head reads
    the flattened final map: 512 * (res // 32)^2 inputs at res >= 32, 512 below. Below 32 a
    max-pool that would leave convolutions to run on a 1x1 map is skipped (a per-sample norm
    of a 1x1 map is zero), so they run at 2x2 and only the last pool reaches 1x1.
    """

    def __init__(self, num_classes: int, channels: int, res: int, norm: str = "instance",
                 small: bool = False):
        super().__init__()
        if not small and _halved(res, 5) < 1:
            raise NetworkConfigError(f"VGG-11 needs a resolution of at least 32, got {res}")
        layers: list[nn.Module] = []
        in_channels, size = channels, res
        for i, item in enumerate(VGG11_LAYOUT):
            if item == "M":
                last = i == len(VGG11_LAYOUT) - 1
                if not small or size >= (2 if last else 4):
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1), make_norm(norm, item),
                           nn.ReLU()]
                in_channels = item
        if not small:
            layers.append(nn.AdaptiveMaxPool2d(7))
            size = 7
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512 * size * size, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


# ----------------------------------------------------------------------------- AlexNet

class AlexNet(ClassifierNet):
    """The DC-style AlexNet: 128/192/256/192/192 channels, 5x5 then 3x3 convs, three max-pools.

    Head input 192 * (res / 8)^2 (49,152 at 128). No normalisation in the released model
    (norm="none"); another norm inserts that layer after every conv.
    """

    def __init__(self, num_classes: int, channels: int, res: int, norm: str = "none"):
        super().__init__()
        if _halved(res, 3) < 1:
            raise NetworkConfigError(f"AlexNet needs a resolution of at least 8, got {res}")

        def conv(cin, cout, kernel):
            return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), make_norm(norm, cout),
                    nn.ReLU()]

        self.features = nn.Sequential(
            *conv(channels, 128, 5), nn.MaxPool2d(2),
            *conv(128, 192, 5), nn.MaxPool2d(2),
            *conv(192, 256, 3), *conv(256, 192, 3), *conv(192, 192, 3), nn.MaxPool2d(2))
        self.head = nn.Linear(192 * _halved(res, 3) ** 2, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)


# ----------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        batch, tokens, _ = x.shape
        qkv = self.to_qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class TransformerBlock(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x)). norm is Identity in the released model."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, norm: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.attn = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(ClassifierNet):
    """Small ViT: patch 16, dim 512, depth 10, 8 heads x 64, MLP 512, cls-token pooling.

    As released (GLaD/LD3M, after lucidrains' vit-pytorch with the LayerNorms commented out)
    there is no normalisation: norm="none". norm="layer" restores pre-norm LayerNorms and a
    final one before the head. Patches are flattened in (row, col, channel) order. The
    resolution must be a multiple of the patch size; the position table is sized for it.
    """

    def __init__(self, num_classes: int, channels: int, res: int, norm: str = "none",
                 patch: int = 16, dim: int = 512, depth: int = 10, heads: int = 8,
                 dim_head: int = 64, mlp_dim: int = 512):
        super().__init__()
        check_norm(norm, VIT_NORMS)
        if res % patch:
            raise NetworkConfigError(f"ViT needs a resolution divisible by its patch size {patch}, "
                                     f"got {res}")
        self.patch = patch
        num_patches = (res // patch) ** 2
        self.to_patch_embedding = nn.Linear(channels * patch * patch, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, dim_head, mlp_dim, norm)
                                      for _ in range(depth)))
        self.final_norm = nn.LayerNorm(dim) if norm == "layer" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/p * W/p, p*p*C)."""
        batch, channels, height, width = x.shape
        p = self.patch
        x = x.reshape(batch, channels, height // p, p, width // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), -1)

    def embed(self, x):
        tokens = self.to_patch_embedding(self.patches(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.pos_embedding
        return self.final_norm(self.blocks(tokens))[:, 0]


# ----------------------------------------------------------------------------- factory

_ARCH_PATTERN = re.compile(r"^(convnet|resnet18|vgg11|alexnet|vit)(?:d(\d+))?$")


def parse_arch(arch: str) -> tuple[str, int | None]:
    """'ConvNet', 'convnet-d3', 'ResNet-18', 'vgg_11', ... -> (canonical name, depth or None)."""
    key = re.sub(r"[-_\s]", "", str(arch).lower())
    match = _ARCH_PATTERN.match(key)
    if not match or (match.group(2) and match.group(1) != "convnet"):
        raise NetworkConfigError(f"unknown architecture {arch!r}: use one of "
                                 f"{', '.join(ARCHITECTURES)} (or convnetd3..convnetd6)")
    return match.group(1), int(match.group(2)) if match.group(2) else None


def build_network(arch: str, *, num_classes: int, channels: int = 3, res: int, width: int = 128,
                  depth: int | None = None, norm: str | None = None,
                  form: str | None = None) -> ClassifierNet:
    """Build a freshly initialised network (PyTorch default init).

    arch: convnet (optionally convnetd<N>), resnet18, vgg11, alexnet, vit.
    norm: instance | batch | layer | none; None = the architecture's released default
        (instance for convnet/resnet18/vgg11, none for alexnet/vit; vit accepts none|layer).
    width, depth: ConvNet only (depth None = `default_convnet_depth(res)`); the other
        architectures have fixed shapes and ignore them.
    form: "full" | "small" | None = by resolution (`network_form`: small below 128).
    Input (B, channels, res, res); `embed` -> (B, F), `forward` -> (B, num_classes).
    """
    name, depth_from_name = parse_arch(arch)
    small = network_form(res, form) == "small"
    norm = DEFAULT_NORMS[name] if norm is None else norm
    check_norm(norm, VIT_NORMS if name == "vit" else NORMS)
    if name == "convnet":
        depth = depth or depth_from_name or default_convnet_depth(res)
        return ConvNet(num_classes, channels, res, width=width, depth=depth, norm=norm)
    if name == "resnet18":
        return ResNet18(num_classes, channels, norm=norm, res=res if small else None)
    if name == "vgg11":
        return VGG11(num_classes, channels, res, norm=norm, small=small)
    if name == "alexnet":
        return AlexNet(num_classes, channels, res, norm=norm)
    if small:
        return ViT(num_classes, channels, res, norm=norm, patch=vit_patch_size(res), depth=SMALL_VIT_DEPTH)
    return ViT(num_classes, channels, res, norm=norm, patch=vit_patch_size(res))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- torchvision ResNet-18

class TorchvisionBasicBlock(nn.Module):
    """torchvision's `BasicBlock` (expansion 1, BatchNorm, ReLU), with its parameter names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TorchvisionResNet18(nn.Module):
    """The ImageNet ResNet-18 of torchvision (`torchvision.models.resnet18`), so that its state
    dicts load here without torchvision: a 7x7 stride-2 stem, a 3x3 stride-2 max-pool, four stages
    of two `BasicBlock`s (64, 128, 256, 512 channels), global average pool, `fc`.

    The parameter and buffer names are torchvision's (conv1, bn1, layer1.0.conv1, ...,
    layer2.0.downsample.0, fc; 122 state-dict entries), and so is the count: 11,689,512
    parameters with 1000 classes. Input: (B, 3, H, W) in ImageNet normalisation (224x224 for
    the pretrained weights); output (B, num_classes) logits. This is the scorer of the released
    pruning study (prune_and_distill get_losses_imagenet.py:14) and a teacher for soft labels.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for i, (channels, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(TorchvisionBasicBlock(in_channels, channels, stride),
                                                     TorchvisionBasicBlock(channels, channels, 1)))
            in_channels = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a pickle read with `weights_only=True`
    (a plain state dict, or one under a "state_dict" key). One-line `LD3MError`s."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise LD3MError(f"{path} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and safetensors errors have no common base
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LD3MError(f"cannot read {path} as a state dict: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LD3MError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def load_torchvision_resnet18(path) -> TorchvisionResNet18:
    """A `TorchvisionResNet18` with the weights of `path` (torchvision's state dict of
    `resnet18`, any number of classes), checked strictly: missing, unexpected and misshapen
    entries are one `LD3MError` that names them. Returned in eval mode."""
    state = read_state_dict(path)
    fc = state.get("fc.weight")
    if fc is None or fc.dim() != 2 or fc.shape[1] != 512:
        hint = " (keys start with 'module.': save model.module.state_dict())" if \
            any(k.startswith("module.") for k in state) else ""
        raise LD3MError(f"{path} is not a torchvision ResNet-18 state dict: no fc.weight of shape "
                        f"(classes, 512){hint}")
    model = TorchvisionResNet18(num_classes=int(fc.shape[0]))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} ({len(names)})"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
                if names]
    if problems:
        raise LD3MError(f"{path} does not match torchvision's ResNet-18: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model.eval()
