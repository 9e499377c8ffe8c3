"""Reference ConvNet: the released layer stack written plainly, the oracle for `networks.ConvNet`.

    [conv3x3 -> norm -> ReLU -> nn.AvgPool2d(2)] x depth -> flatten -> linear

The layers are the released `ConvNet`'s (`nn.ReLU(inplace=True)`, `nn.AvgPool2d(2, 2)`,
instance norm = `nn.GroupNorm(C, C)`), so it is also the released side's student in the
benchmarks.

Same parameter names as `ld3m_fast.networks.ConvNet` (features.{4i}.weight, ..., head.weight),
so `ConvNetRef.from_network(net)` carries a ConvNet's weights over exactly; the fast
network (in-place ReLU, vectorised 2x2 pooling) is tested against it in float64.
"""
from __future__ import annotations

import torch.nn as nn


class ConvNetRef(nn.Module):
    """The plain ConvNet; `embed(x)` -> (B, F) features, `forward(x)` -> logits."""

    def __init__(self, num_classes: int, channels: int, res: int, width: int = 128, depth: int = 3,
                 norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, size = channels, res
        for _ in range(depth):
            if norm == "instance":
                norm_layer = nn.GroupNorm(width, width, affine=True)
            elif norm == "layer":
                norm_layer = nn.GroupNorm(1, width, affine=True)
            elif norm == "batch":
                norm_layer = nn.BatchNorm2d(width)
            else:
                norm_layer = nn.Identity()
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), norm_layer,
                       nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)]
            in_channels, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * size * size, num_classes)

    @classmethod
    def from_network(cls, net) -> "ConvNetRef":
        """A reference with the weights (and dtype) of a `networks.ConvNet`."""
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        norm_layer = net.features[1]
        if isinstance(norm_layer, nn.GroupNorm):
            norm = "instance" if norm_layer.num_groups == norm_layer.num_channels else "layer"
        elif isinstance(norm_layer, nn.BatchNorm2d):
            norm = "batch"
        else:
            norm = "none"
        width = convs[0].out_channels
        side = int(round((net.head.in_features / width) ** 0.5))
        ref = cls(net.head.out_features, convs[0].in_channels, side * 2 ** len(convs), width=width,
                  depth=len(convs), norm=norm)
        ref.load_state_dict(net.state_dict(), strict=True)
        dtype = next(net.parameters()).dtype
        return ref.to(dtype).train(net.training)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x))
