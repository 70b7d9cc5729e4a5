"""Small hand-written models, one per coupling pattern the tracer must follow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    """conv -> bn -> relu -> conv -> pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.b(self.a(x)), 1), 1))


class Residual(nn.Module):
    """add / sub / mul with broadcasting couple the channels of both operands."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = cbr(16, 16)
        self.b2 = cbr(16, 16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.b1(x)
        x = self.b2(x) - x
        g = torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        return self.head(x * g)


class Concat(nn.Module):
    """cat along channels (index offsets) and chunk back into equal pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 12)
        self.b = cbr(3, 20)
        self.mix = cbr(32, 16)
        self.left = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        left, right = y.chunk(2, dim=1)
        return self.out(torch.cat([self.left(left), right], 1))


class Grouped(nn.Module):
    """depthwise, depthwise with multiplier, grouped conv and GroupNorm keep whole groups."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 24, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.dwm = nn.Conv2d(24, 48, 3, padding=1, groups=24)
        self.gn = nn.GroupNorm(6, 48)
        self.gc = nn.Conv2d(48, 32, 3, padding=1, groups=4)
        self.prelu = nn.PReLU(32)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.prelu(self.gc(self.gn(self.dwm(self.dw(self.pw(x)))))))


class Shuffle(nn.Module):
    """channel shuffle written as view -> transpose -> view, and as nn.ChannelShuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = nn.Conv2d(16, 16, 1)
        self.shuffle = nn.ChannelShuffle(4)
        self.head = nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(self.shuffle(self.b(x)))


class FlattenLinear(nn.Module):
    """flatten(C, H, W) -> Linear: each channel owns H*W input features."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_max_pool2d(self.a(x), 4)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class LayerScale(nn.Module):
    """a Parameter used directly in forward, a channels-last LayerNorm and Linear (ConvNeXt)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        self.scale = nn.Parameter(torch.full((16, 1, 1), 0.5))
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.down(F.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.head(x + self.scale * y)


class Conv1d3dTranspose(nn.Module):
    """Conv1d, Conv3d, ConvTranspose2d, BatchNorm1d/3d, InstanceNorm2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(2, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm2d(16, affine=True)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.c1 = nn.Conv1d(12, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(10)
        self.head = nn.Conv1d(10, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn3(self.c3(x))).mean(2)
        x = self.up(F.relu(self.inorm(self.c2(x))))
        x = x.flatten(2)
        return self.head(F.relu(self.bn1(self.c1(x))))


class TrainOnlyAux(nn.Module):
    """an auxiliary head reached only in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(16, 16)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(32, 3))
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.a(x)
        aux = self.aux(x) if self.training else None
        out = self.fc(self.b(x).mean((2, 3)))
        return (out, aux) if self.training else out


class NormAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own (timm's BatchNormAct2d)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm over one group, called functionally (timm's GroupNorm1): not exact."""

    def __init__(self, c: int) -> None:
        super().__init__(1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNormFn(nn.GroupNorm):
    """GroupNorm with 4 groups called functionally: whole groups go."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ConvSame(nn.Conv2d):
    """'same' padding computed in forward, then F.conv2d (timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MyConv(nn.Module):
    """A user's own conv: raw Parameters and F.conv2d, no nn.Conv2d anywhere."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=1)


class MyBN(nn.Module):
    """A user's own batch norm: raw Parameter/buffers and F.batch_norm."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.beta = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("mean", torch.randn(c) * 0.1)
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.mean, self.var, self.gamma, self.beta, self.training)


class MyLinear(nn.Module):
    """A user's own linear layer: F.linear on raw Parameters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) * 0.2)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Functional(nn.Module):
    """Layers built from torch functions: subclasses with their own forward, raw Parameters,
    a per-channel PReLU weight, a layer-scale gamma."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvSame(3, 16, 3, stride=2)
        self.bn = NormAct(16)
        self.conv = MyConv(16, 32)
        self.mybn = MyBN(32)
        self.alpha = nn.Parameter(torch.rand(32) * 0.3)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.gn = GroupNormFn(8, 32)
        self.gamma = nn.Parameter(torch.rand(32) + 0.5)
        self.proj = MyConv(32, 24)
        self.head = MyLinear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = F.prelu(self.mybn(self.conv(x)), self.alpha)
        x = x + self.gamma[None, :, None, None] * self.gn(self.dw(x))
        x = F.relu(self.proj(x))
        return self.head(x.mean((2, 3)))


class FunctionalGN1(nn.Module):
    """GroupNorm over a single group (normalises over all channels): prunes, marked not exact."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = GroupNorm1(16)
        self.b = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.gn(self.a(x))))


class JoinedBias(nn.Module):
    """A layer's weight used with a bias joined from parameters and a buffer (timm's BEiT
    attention: ``F.linear(x, self.qkv.weight, torch.cat((q_bias, k_bias, v_bias)))``)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.randn(d))
        self.register_buffer("k_bias", torch.zeros(d), persistent=False)
        self.v_bias = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = F.linear(self.inp(x), weight=self.qkv.weight, bias=bias).chunk(3, -1)
        return self.proj(q * k + v)


PATTERNS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "chain": (Chain, (2, 3, 16, 16)),
    "residual": (Residual, (2, 3, 16, 16)),
    "concat": (Concat, (2, 3, 16, 16)),
    "grouped": (Grouped, (2, 3, 16, 16)),
    "shuffle": (Shuffle, (2, 3, 16, 16)),
    "flatten_linear": (FlattenLinear, (2, 3, 16, 16)),
    "layer_scale": (LayerScale, (2, 3, 16, 16)),
    "conv1d3d_transpose": (Conv1d3dTranspose, (2, 2, 4, 8, 8)),
    "train_only_aux": (TrainOnlyAux, (2, 3, 16, 16)),
    "functional": (Functional, (2, 3, 16, 16)),
    "functional_gn1": (FunctionalGN1, (2, 3, 16, 16)),
    "joined_bias": (JoinedBias, (2, 5, 8)),
}
