"""Random networks composed from the coupling patterns, for property tests and benchmarks/fuzz.py.

A network is a JSON-able spec (``dims``, ``width``, a list of blocks, heads, inputs) drawn by
the hypothesis strategy ``specs()``; ``build(spec)`` turns it into an ``nn.Module`` and an example
input.
Blocks keep the spatial size, so any sequence of them composes; each one exercises one way that
channels couple (residual add/sub/mul, concat, chunk/split, grouped and depthwise convs with a
channel multiplier, SE gates, a module called twice, functional layers on raw Parameters, a
layer-scale Parameter, transposed convs, channel shuffle, GroupNorm), and now and then a parameter
read by an op that no rule knows, which must be refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BLOCKS = ["conv", "residual", "concat", "chunk", "split", "grouped", "depthwise", "se",
          "shared", "functional", "layer_scale", "transpose", "shuffle", "groupnorm"]


def _conv(dims: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _convt(dims: int) -> type[nn.Module]:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]


def _bn(dims: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]


def _cbr(dims: int, cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv(dims)(cin, cout, k, padding=k // 2, groups=groups),
                         _bn(dims)(cout), nn.ReLU())


class Block(nn.Module):
    """One pattern; ``cin`` channels in, ``self.cout`` out, spatial size kept."""

    def __init__(self, kind: str, dims: int, cin: int, width: int, arg: int) -> None:
        super().__init__()
        self.kind, self.dims = kind, dims
        conv, cbr = _conv(dims), lambda a, b, **kw: _cbr(dims, a, b, **kw)
        self.cout = width
        if kind == "conv":
            self.f = cbr(cin, width, k=1 + 2 * (arg % 2))
        elif kind == "residual":
            self.stem = cbr(cin, width)
            self.f = nn.Sequential(cbr(width, width), conv(width, width, 3, padding=1))
            self.op = ["add", "sub", "mul"][arg % 3]
        elif kind == "concat":
            self.a, self.b = cbr(cin, width // 2), cbr(cin, width - width // 2, k=1)
        elif kind in ("chunk", "split"):
            self.stem = cbr(cin, 2 * (width // 2))
            self.f = cbr(width // 2, width // 2)
            self.cout = 2 * (width // 2)
        elif kind == "grouped":
            g = 4 + 4 * (arg % 2)  # whole groups go: enough of them to remove some
            self.cout = g * max(1, width // g)
            self.stem = cbr(cin, self.cout)
            self.f = cbr(self.cout, self.cout, groups=g)
        elif kind == "depthwise":
            mult = 1 + arg % 2
            self.stem = cbr(cin, width)
            self.f = nn.Sequential(conv(width, width * mult, 3, padding=1, groups=width),
                                   _bn(dims)(width * mult), nn.ReLU())
            self.cout = width * mult
        elif kind == "se":
            self.stem = cbr(cin, width)
            self.squeeze = conv(width, max(2, width // 4), 1)
            self.excite = conv(max(2, width // 4), width, 1)
        elif kind == "shared":
            self.stem = cbr(cin, width)
            self.f = cbr(width, width)
        elif kind == "functional":
            self.w = nn.Parameter(torch.randn(width, cin, *([3] * dims)) * 0.3)
            self.b = nn.Parameter(torch.randn(width) * 0.1)
            self.gamma = nn.Parameter(torch.rand(width) + 0.5)
            self.beta = nn.Parameter(torch.randn(width) * 0.1)
            self.register_buffer("mean", torch.randn(width) * 0.1)
            self.register_buffer("var", torch.rand(width) + 0.5)
        elif kind == "layer_scale":
            self.stem = cbr(cin, width)
            self.f = cbr(width, width)
            self.scale = nn.Parameter(torch.rand(width) + 0.5)
        elif kind == "transpose":
            self.f = nn.Sequential(_convt(dims)(cin, width, 3, padding=1), _bn(dims)(width),
                                   nn.ReLU())
        elif kind == "shuffle":  # after a grouped conv every channel is one unit (issue 10)
            self.g = 2
            self.cout = 2 * max(1, width // 2)
            self.stem = cbr(cin, self.cout)
            self.f = cbr(self.cout, self.cout, groups=1 + arg % 2)
        elif kind == "unknown":  # a parameter read by an op no rule knows: must be refused
            self.f = cbr(cin, width)
            self.mix = nn.Parameter(torch.randn(width, width) * 0.3)
        elif kind == "groupnorm":
            g = 4 + 4 * (arg % 2)
            self.cout = g * max(1, width // g)
            self.f = nn.Sequential(conv(cin, self.cout, 3, padding=1), nn.GroupNorm(g, self.cout),
                                   nn.GELU())
        else:
            raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k in ("conv", "transpose", "groupnorm"):
            return self.f(x)
        if k == "residual":
            x = self.stem(x)
            y = self.f(x)
            if self.op == "add":
                return x + y
            return x - y if self.op == "sub" else x * torch.sigmoid(y)
        if k == "concat":
            return torch.cat([self.a(x), self.b(x)], dim=1)
        if k == "chunk":
            a, b = self.stem(x).chunk(2, dim=1)
            return torch.cat([self.f(a), b], dim=1)
        if k == "split":
            x = self.stem(x)
            a, b = x.split(x.size(1) // 2, dim=1)
            return torch.cat([b, self.f(a)], dim=1)
        if k in ("grouped", "depthwise"):
            return self.f(self.stem(x))
        if k == "unknown":
            return torch.einsum("bc...,oc->bo...", self.f(x), self.mix)
        if k == "se":
            x = self.stem(x)
            s = x.mean(tuple(range(2, x.ndim)), keepdim=True)
            return x * torch.sigmoid(self.excite(F.relu(self.squeeze(s))))
        if k == "shared":
            x = self.stem(x)
            return self.f(self.f(x)) + x  # the same module twice
        if k == "functional":
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.dims]
            y = conv(x, self.w, self.b, padding=1)
            y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, self.training)
            return F.relu(y)
        if k == "layer_scale":
            x = self.stem(x)
            shape = (1, -1) + (1,) * self.dims
            return x + self.scale.view(shape) * self.f(x)
        if k == "shuffle":
            x = self.f(self.stem(x))
            n, c = x.shape[:2]
            rest = x.shape[2:]
            return x.view(n, self.g, c // self.g, *rest).transpose(1, 2).reshape(n, c, *rest)
        raise ValueError(k)


class GenNet(nn.Module):
    """Blocks in a chain, optional second input, one or two heads."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        dims, c = spec["dims"], spec["in_channels"]
        self.spec = spec
        self.second = _conv(dims)(spec["in_channels"], 1, 1) if spec["two_inputs"] else None
        blocks = []
        for kind, width, arg in spec["blocks"]:
            b = Block(kind, dims, c, width, arg)
            blocks.append(b)
            c = b.cout
        self.blocks = nn.ModuleList(blocks)
        self.flatten_head = spec["flatten_head"]
        size = spec["size"] ** dims
        self.fc = nn.Linear(c * size if self.flatten_head else c, spec["classes"])
        self.aux = nn.Linear(c, 3) if spec["two_outputs"] else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        if self.second is not None and y is not None:
            x = x + self.second(y)  # the second input is broadcast over channels
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        pooled = x.mean(tuple(range(2, x.ndim)))
        logits = self.fc(torch.flatten(x, 1) if self.flatten_head else pooled)
        if self.aux is not None:
            return logits, self.aux(pooled)
        return logits


@st.composite
def specs(draw: Any) -> dict[str, Any]:
    dims = draw(st.sampled_from([1, 2, 2, 2, 3]))
    n = draw(st.integers(1, 4))
    blocks = [(draw(st.sampled_from(BLOCKS)), draw(st.integers(8, 24)), draw(st.integers(0, 5)))
              for _ in range(n)]
    if draw(st.sampled_from(range(30))) == 17:  # now and then a layer no rule knows
        blocks.insert(draw(st.integers(0, n)), ("unknown", draw(st.integers(8, 24)), 0))
    return {"dims": dims, "in_channels": draw(st.integers(1, 4)),
            "size": {1: 8, 2: 6, 3: 4}[dims], "blocks": blocks,
            "two_inputs": draw(st.booleans()), "two_outputs": draw(st.booleans()),
            "flatten_head": draw(st.booleans()), "classes": draw(st.integers(2, 5)),
            "ratio": draw(st.sampled_from([0.25, 0.5, 0.75])),
            "criterion": draw(st.sampled_from(["l1", "l2", "random"])),
            "round_to": draw(st.sampled_from([1, 1, 2, 4]))}


def build(spec: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The network and an example input (batch 2) for a spec."""
    model = GenNet(spec)
    g = torch.Generator().manual_seed(len(str(spec)))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    shape = (2, spec["in_channels"]) + (spec["size"],) * spec["dims"]
    x = torch.randn(shape, generator=g)
    return model, ((x, torch.randn(shape, generator=g)) if spec["two_inputs"] else (x,))


def check(spec: dict[str, Any]) -> str:
    """Prune a generated network and classify what happened.

    ``exact`` / ``not exact`` (a cross-channel norm on a pruned axis; shapes verified) /
    ``nothing removed`` / ``refused: <error>``; anything starting with ``BUG`` is a defect: a
    wrong or untrainable pruned model, a crash that is not a clear SurgeryError, or a modified
    original.
    """
    import warnings

    import surgery

    model, x = build(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = surgery.plan(model, x, ratio=spec["ratio"], criterion=spec["criterion"],
                                round_to=spec["round_to"])
            small = surgery.apply(model, plan)
            report = surgery.verify(model, small, plan, x)
        outcome = "exact" if report.exact_checked else "not exact"
        if surgery.count_params(small) == surgery.count_params(model):
            outcome = "nothing removed"
    except surgery.VerificationError as e:
        return f"BUG: wrong pruned model: {str(e).splitlines()[0][:300]}"
    except surgery.SurgeryError as e:
        outcome = f"refused: {type(e).__name__}"
        small = None
    except Exception as e:  # noqa: BLE001  (anything else is a defect)
        return f"BUG: crash {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    after = model.state_dict()
    if after.keys() != before.keys() or any(not torch.equal(after[k], v)
                                            for k, v in before.items()):
        return "BUG: the original model was modified"
    if small is not None:
        try:
            small.train()
            out = small(*x)
            loss = sum(o.pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
            loss.backward()
        except Exception as e:  # noqa: BLE001
            return f"BUG: pruned model does not train: {type(e).__name__}: {e}"
    return outcome
