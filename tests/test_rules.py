"""Per-rule checks: every constructor argument, flag and dtype survives the surgery."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, randomize_norms, snapshot
from torch import nn

import surgery
from surgery.groups import TVal


def _conv_model(conv_kwargs: dict, dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, **conv_kwargs, dtype=dtype),
        nn.BatchNorm2d(16, eps=1e-3, momentum=0.3, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, **conv_kwargs, dtype=dtype),
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_keeps_constructor_arguments(bias: bool, padding_mode: str,
                                          dtype: torch.dtype) -> None:
    kw = {"bias": bias, "padding_mode": padding_mode, "padding": 2, "dilation": 2, "stride": 1}
    model = randomize_norms(_conv_model(kw, dtype))
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    a, bn, b = small[0], small[1], small[3]
    assert (a.out_channels, bn.num_features, b.in_channels) == (8, 8, 8)
    for m in (a, b):
        assert (m.padding, m.dilation, m.stride, m.padding_mode) == ((2, 2), (2, 2), (1, 1),
                                                                     padding_mode)
        assert (m.bias is not None) == bias and m.weight.dtype == dtype
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-3, 0.3, True, True)
    assert bn.running_mean.shape == (8,) and bn.running_mean.dtype == dtype
    assert small[0]._reversed_padding_repeated_twice == model[0]._reversed_padding_repeated_twice


def test_flags_modes_and_requires_grad_survive() -> None:
    model = randomize_norms(_conv_model({"padding": 1}, torch.float32))
    model[0].weight.requires_grad_(False)  # frozen layer
    model.train()
    model[1].eval()  # a module in eval inside a training model
    model[0].my_note = "user attribute"
    x = torch.randn(2, 3, 8, 8)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert not small[0].weight.requires_grad and small[0].bias.requires_grad
    assert small.training and not small[1].training and small[3].training
    assert small[0].my_note == "user attribute"
    assert model[0].out_channels == 16  # the original is untouched


class _Counting(nn.Module):
    """A forward that writes its module's state: buffers of three dtypes, a plain int, a dict
    and a list."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(3))
        self.register_buffer("flag", torch.zeros(2, dtype=torch.bool))
        self.runs = 0
        self.last: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += x.mean((0, 2, 3))
        self.flag[0] = True
        self.runs += 1
        self.last["input"] = x
        self.inputs.append(x)
        return self.head(torch.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_forward_that_writes_its_state_leaves_both_models_as_they_were(mode: str) -> None:
    """Tracing, planning and verifying run the forward (symbolically: ``self.calls += 1`` would
    leave a tracer's Proxy in the buffer's place; and for real, on the original's own tensors),
    yet the user's model and the pruned one keep every value and attribute they had."""
    model = getattr(randomize_norms(_Counting()), mode)()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert plan.layers["conv"].axes["out"].size == 16 and model.runs == 0
    small = surgery.apply(model, plan)
    after_apply = snapshot(small)
    assert surgery.verify(model, small, plan, x).passed
    assert_unchanged(model, before)
    assert_unchanged(small, after_apply)
    assert (model.runs, small.runs) == (0, 0) and model.training == (mode == "train")
    assert (model.last, model.inputs, small.last, small.inputs) == ({}, [], {}, [])


def test_norm_variants() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12, affine=False),
                          nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12, track_running_stats=False),
                          nn.Conv2d(12, 12, 1), nn.InstanceNorm2d(12, track_running_stats=True),
                          nn.Conv2d(12, 12, 1), nn.GroupNorm(4, 12, affine=False),
                          nn.Conv2d(12, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small[1].num_features == 6 and small[1].weight is None
    assert small[3].num_features == 6 and small[3].running_mean is None
    assert small[5].num_features == 6 and small[5].running_mean.shape == (6,)
    assert small[7].num_groups == 2 and small[7].num_channels == 6


class _RmsNorm(nn.Module):
    """An RMS norm of one's own (as timm writes it): ``F.rms_norm`` over a size attribute."""

    def __init__(self, n: int, literal: bool = False) -> None:
        super().__init__()
        self.normalized_shape, self.literal = (n,), literal
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (24,) if self.literal else self.normalized_shape
        return nn.functional.rms_norm(x, shape, self.weight, 1e-6)


@pytest.mark.parametrize("norm", ["torch", "own", "literal"])
def test_rms_norms_lose_channels_as_layer_norm_does(norm: str) -> None:
    layer = nn.RMSNorm(24) if norm == "torch" else _RmsNorm(24, literal=norm == "literal")
    model = nn.Sequential(nn.Linear(8, 24), layer, nn.GELU(), nn.Linear(24, 4))
    x = torch.randn(2, 5, 8)
    if norm == "literal":  # a size written in the call cannot follow: those channels stay
        with pytest.raises(surgery.NothingToPruneError, match="rms_norm over a size written in "
                                                              "the call .*test_rules.py"):
            surgery.plan(model, x, ratio=0.5, round_to=1)
        return
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert_unchanged(model, before)
    assert small[0].out_features == 12 == small[1].weight.shape[0] == small[3].in_features
    assert tuple(small[1].normalized_shape) == (12,)
    # the mean square is over every channel: not equal to the zeroed original, but to it with
    # the norm over the kept channels alone (checked by value)
    assert not plan.exact and report.exact_checked and report.kept_sites == 1
    assert small(x).shape == (2, 5, 4)


class _StdConv(nn.Conv2d):
    """A weight-standardised conv with a per-filter gain (timm's ``ScaledStdConv2d``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                     weight=self.gain.view(-1), training=True, eps=1e-6)
        return self._conv_forward(x, w.reshape_as(self.weight), self.bias)


def test_a_weight_standardised_in_forward_is_still_the_layers_filters() -> None:
    model = nn.Sequential(_StdConv(3, 16), nn.ReLU(), _StdConv(16, 16), nn.ReLU(),
                          nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert_unchanged(model, before)
    assert small[0].out_channels == 8 == small[2].in_channels and small[2].out_channels == 8
    assert small[0].gain.shape == (8, 1, 1, 1) and type(small[0]) is _StdConv
    assert torch.equal(small[0].gain, model[0].gain[plan.layers["0"].axes["out"].kept()])
    # a filter's statistics are over all its inputs: removing inputs is allowed, not exact
    assert not plan.exact and not report.exact_checked
    # whose inputs stay (the image), loses filters exactly: checked value by value
    first = nn.Sequential(_StdConv(3, 16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    plan = surgery.plan(first, x, ratio=0.5, round_to=1)
    assert plan.exact and surgery.verify(first, surgery.apply(first, plan), plan, x).exact_checked


class _RelPos(nn.Module):
    """A relative-position table gathered by an index buffer and read by einsum along the
    query's channels (SAM's and MViT's decomposed relative positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.table = nn.Parameter(torch.randn(7, 16))
        self.register_buffer("idx", torch.arange(4)[:, None] - torch.arange(4)[None] + 3)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.einsum("bhwc,hkc->bhwk", self.q(x), self.table[self.idx]))


def test_a_table_einsum_reads_along_channels_is_sliced_with_them() -> None:
    model, x = _RelPos(), torch.randn(2, 4, 4, 8)
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert_unchanged(model, before)
    assert small.q.out_features == 8 and small.table.shape == (7, 8)
    assert torch.equal(small.table, model.table[:, plan.layers["q"].axes["out"].kept()])
    # summed over, and the table reads them: the reference zeroes its removed entries
    assert report.exact_checked and report.passed


def test_a_table_shared_by_heads_leaves_their_width_alone() -> None:
    class Heads(_RelPos):  # heads folded into the batch dim (SAM): one table for every head
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, _ = x.shape
            q = self.q(x).reshape(b, h, w, 4, -1).permute(0, 3, 1, 2, 4).reshape(b * 4, h, w, -1)
            rel = torch.einsum("bhwc,hkc->bhwk", q, self.table[self.idx][..., :4])
            return self.out(rel.reshape(b, 4, h, w, 4).sum(1))

    model, x = Heads(), torch.randn(1, 4, 4, 8)
    graph = surgery.trace(model, x)
    assert "16 channels in 4 units" in graph.explain("q")  # whole heads, each 4 wide
    with pytest.raises(KeyError):
        graph.explain("table")  # its width is a head's, which stays: not a slot


def test_a_table_read_by_einsum_does_not_make_a_q_k_product_exact() -> None:
    class RelAttention(nn.Module):  # one head: q.k (einsum) plus q read by a position table
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(8, 16)
            self.table = nn.Parameter(torch.randn(5, 16))
            self.proj = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k = self.q(x), self.k(x)
            scores = torch.einsum("bnc,bmc->bnm", q, k) + torch.einsum("bnc,mc->bnm", q,
                                                                      self.table)
            return self.proj(scores.softmax(-1) @ self.v(x))

    model, x = RelAttention(), torch.randn(2, 5, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    assert small.q.out_features == 8 == small.table.shape[1]
    # q's removed channels still count in q @ k^T of the reference: not exact (shapes checked)
    assert not plan.exact and surgery.verify(model, small, plan, x).passed


def test_a_weight_einsum_sums_over_reads_the_channels_exactly() -> None:
    class Mix(nn.Module):  # a 1x1 conv written with einsum, no rule of its own
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bchw,oc->bohw", x, self.w)

    model = nn.Sequential(nn.Conv2d(3, 16, 3), Mix(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    assert small[0].out_channels == 8 and small[1].w.shape == (4, 8)  # its outputs stay
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked


class _Ghost(nn.Module):
    """GhostNet's module: a conv, a cheap depthwise conv of it, both joined and sliced to the
    width an attribute says (the whole join here: ``stop`` = its width, or a literal)."""

    def __init__(self, cin: int, cout: int, stop: int | None = None) -> None:
        super().__init__()
        self.out_chs, self.stop = cout, stop
        self.primary = nn.Conv2d(cin, cout // 2, 1)
        self.cheap = nn.Conv2d(cout // 2, cout // 2, 3, padding=1, groups=cout // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        out = torch.cat([x1, self.cheap(x1)], dim=1)
        return out[:, :self.out_chs if self.stop is None else self.stop, :, :]


@pytest.mark.parametrize("stop", [None, 64, 12])
def test_a_slice_that_keeps_the_whole_channel_dim_still_does(stop: int | None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _Ghost(8, 16, stop),
                          nn.Conv2d(min(stop or 16, 16), 4, 1))
    x = torch.randn(1, 3, 8, 8)
    if stop == 12:  # a part of the channels: those stay
        graph = surgery.trace(model, x)
        assert "slices the channel dim" in graph.explain("1.primary")
        return
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked
    assert small[1].primary.out_channels == 4 and small[2].in_channels == 8
    assert small[1].out_chs == (8 if stop is None else 16)  # the attribute follows the count


def test_pixel_shuffle_moves_channels_in_blocks() -> None:
    class SuperRes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
            self.up, self.c = nn.PixelShuffle(2), nn.Conv2d(8, 16, 3, padding=1)
            self.d = nn.Conv2d(64, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.up(self.b(torch.relu(self.a(x))))  # 32 channels -> 8 at twice the size
            return self.d(nn.functional.pixel_unshuffle(self.c(y), 2))  # 16 -> 64 at 1x

    model, x = SuperRes(), torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked
    assert small.b.out_channels == 16 and small.c.in_channels == 4  # 4 per upsampled channel
    assert small.c.out_channels == 8 and small.d.in_channels == 32
    kept = plan.layers["b"].axes["out"].kept().reshape(-1, 4)
    assert torch.equal(kept % 4, torch.arange(4).expand_as(kept))  # whole blocks of r*r


@pytest.mark.parametrize("offset_groups", [1, 2])
def test_deformable_conv_prunes_as_a_conv_and_keeps_its_offsets(offset_groups: int) -> None:
    from torchvision.ops import DeformConv2d

    class DCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.offset = nn.Conv2d(16, 2 * 9 * offset_groups, 3, padding=1)
            self.mask = nn.Conv2d(16, 9 * offset_groups, 3, padding=1)
            self.dcn, self.b = DeformConv2d(16, 32, 3, padding=1), nn.Conv2d(32, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            mask = torch.sigmoid(self.mask(y))
            return self.b(torch.relu(self.dcn(y, self.offset(y), mask=mask)))

    model, x = DCN(), torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked and type(small.dcn) is DeformConv2d
    assert small.dcn.out_channels == 16 == small.b.in_channels
    assert small.offset.out_channels == 18 * offset_groups  # sized by the kernel
    # several offset groups each cover a fixed share of the inputs: those stay
    assert small.dcn.in_channels == small.a.out_channels == (8 if offset_groups == 1 else 16)


class _LayerNorm2d(nn.Module):
    """A LayerNorm over channels written out by hand (ConvNeXt's reference code)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        x = (x - u) / torch.sqrt((x - u).pow(2).mean(1, keepdim=True) + 1e-6)
        return self.w[:, None, None] * x + self.b[:, None, None]


class _SpatialGate(nn.Module):
    """CBAM's spatial attention: channel mean and max, a conv to one channel, a gate on all."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([torch.mean(x, 1).unsqueeze(1), torch.max(x, 1)[0].unsqueeze(1)], 1)
        return x * torch.sigmoid(self.conv(pooled)) + x.max(dim=3, keepdim=True).values


class _SumGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.sum(1, keepdim=True))


def test_a_mean_over_channels_is_a_statistic_and_a_sum_keeps_them() -> None:
    x = torch.randn(1, 3, 12, 12)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), _LayerNorm2d(16), nn.Conv2d(16, 4, 1))
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    assert small[0].out_channels == 8 == small[1].w.shape[0] == small[2].in_channels
    assert not plan.exact and surgery.verify(model, small, plan, x).passed
    exact = surgery.plan(model, x, ratio=0.5, round_to=1, exact=True)  # keeps those groups
    assert exact.exact and exact.removed() == 0
    # a max too; the gate's one channel, broadcast over the others, stays
    gated = nn.Sequential(nn.Conv2d(3, 16, 3), _SpatialGate(), nn.Conv2d(16, 4, 1))
    plan = surgery.plan(gated, x, ratio=0.5, round_to=1)
    small = surgery.apply(gated, plan)
    assert small[0].out_channels == 8 and small[1].conv.out_channels == 1
    assert not plan.exact and surgery.verify(gated, small, plan, x).passed
    # a sum over channels changes scale as they go: those channels stay
    gated = nn.Sequential(nn.Conv2d(3, 16, 3), _SumGate(), nn.Conv2d(16, 4, 1))
    with pytest.raises(surgery.NothingToPruneError, match="reduces over channels"):
        surgery.plan(gated, x, ratio=0.5, round_to=1)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_groups(groups: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ConvTranspose2d(16, 8, 2, stride=2,
                                                                   groups=groups),
                          nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 4, 4)
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    if groups > 1:  # whole groups go: the group width stays
        assert small[1].in_channels // small[1].groups == 16 // groups
    else:
        assert small[1].in_channels == 8
    assert small[1].out_channels < 8 and small[3].in_channels == small[1].out_channels


def test_registry_refuses_duplicates() -> None:
    from surgery.rules.conv import ConvRule

    with pytest.raises(ValueError, match="already registered"):
        surgery.register_module_rule(ConvRule())


def test_registering_a_rule_makes_a_new_layer_prunable() -> None:
    class Scale(nn.Module):
        """A per-channel scale: y = x * w[c]."""

        def __init__(self, c: int) -> None:
            super().__init__()
            self.c = c
            self.w = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addcmul(x, x, self.w[:, None, None])  # no rule knows addcmul

    class ScaleRule(surgery.ModuleRule):
        types = (Scale,)
        axes = ("features",)

        def propagate(self, ctx, path, m, inputs, out):  # type: ignore[no-untyped-def]
            atoms = ctx.slot(path, "features", ctx.channels_in(inputs[0], 1, m.c))
            return TVal(out.shape, (1,), atoms)

        def shrink(self, m, keep):  # type: ignore[no-untyped-def]
            new = surgery.rules.clone_module(m)
            surgery.rules.set_tensor(new, "w", m.w.detach()[keep["features"]])
            new.c = len(keep["features"])
            return new

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(8), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 4, 4)
    # traced into, the parameter is read by an op no rule knows: refused, naming the layer
    with pytest.raises(surgery.UnsupportedLayerError, match="'1' \\(Scale\\).*addcmul"):
        surgery.prune(model, x, ratio=0.5, round_to=1)
    surgery.register_module_rule(ScaleRule())
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small[0].out_channels == 4 and small[1].w.shape == (4,) and small[1].c == 4


def test_readme_worked_example_a_rule_for_your_own_layer() -> None:
    """The README's example, verbatim in spirit: a user's layer that no rule knows."""
    from surgery import ModuleRule, TVal, register_module_rule
    from surgery.rules import clone_module, set_tensor

    class Affine(nn.Module):  # y = x * scale[c] + shift[c]
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c = c
            self.scale = nn.Parameter(torch.rand(c) + 0.5)
            self.shift = nn.Parameter(torch.randn(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.addcmul(self.shift[:, None, None], x, self.scale[:, None, None])

    class AffineRule(ModuleRule):
        types, axes = (Affine,), ("features",)

        def propagate(self, ctx, path, m, inputs, out):  # type: ignore[no-untyped-def]
            atoms = ctx.slot(path, "features", ctx.channels_in(inputs[0], 1, m.c))
            return TVal(out.shape, (1,), atoms)  # output channel c is input channel c

        def shrink(self, m, keep):  # type: ignore[no-untyped-def]
            new = clone_module(m)
            for name in ("scale", "shift"):
                set_tensor(new, name, getattr(m, name).detach()[keep["features"]])
            new.c = len(keep["features"])
            return new

        def importance(self, m, axis):  # type: ignore[no-untyped-def]
            return m.scale.detach().reshape(-1, 1)

    model = nn.Sequential(nn.Conv2d(3, 16, 3), Affine(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(surgery.UnsupportedLayerError, match="'1' \\(Affine\\).*addcmul"):
        surgery.prune(model, x, ratio=0.5)
    register_module_rule(AffineRule())
    small = surgery.prune(model, x, ratio=0.5)  # verified exact inside
    assert small[1].c == 8 and small[1].scale.shape == (8,) and small[0].out_channels == 8


def test_a_masked_layer_called_by_keyword_falls_back_to_zeroed_weights() -> None:
    """The reference zeroes removed channels on the way into a layer whose rule gives
    ``input_dims``; a call that passes the input under another keyword cannot be masked, so the
    reference is built again with that layer's weights zeroed, and verification still passes."""
    from surgery import ModuleRule, TVal, register_module_rule
    from surgery.rules import clone_module, set_tensor

    class Mix(nn.Module):  # a 1x1 conv written by hand: y[:, o] = sum_i w[o, i] x[:, i]
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.cin, self.cout = cin, cout
            self.w = nn.Parameter(torch.randn(cout, cin))

        def forward(self, *, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("oi,bihw->bohw", self.w, x)

    class MixRule(ModuleRule):
        types, axes = (Mix,), ("in", "out")

        def propagate(self, ctx, path, m, inputs, out):  # type: ignore[no-untyped-def]
            ctx.slot(path, "in", ctx.channels_in(inputs[0], 1, m.cin))
            return TVal(out.shape, (1,), ctx.out_atoms(path, "out", m.cout))

        def shrink(self, m, keep):  # type: ignore[no-untyped-def]
            kin = keep.get("in", torch.arange(m.cin))
            kout = keep.get("out", torch.arange(m.cout))
            new = clone_module(m)
            set_tensor(new, "w", m.w.detach()[kout][:, kin])
            new.cin, new.cout = len(kin), len(kout)
            return new

        def weight_rows(self, m, axis, weight=None):  # type: ignore[no-untyped-def]
            w = m.w.detach() if weight is None else weight
            return w if axis == "out" else w.t()

        def zero_removed(self, m, axis, idx):  # type: ignore[no-untyped-def]
            if axis == "in" and len(idx):
                with torch.no_grad():
                    m.w[:, idx] = 0

        def input_dims(self, m):  # type: ignore[no-untyped-def]
            return {"in": 1}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.mix = Mix(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(x=torch.relu(self.conv(x)))

    register_module_rule(MixRule())
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert small.mix.w.shape == (4, 8) and report.passed and report.max_rel_error < 1e-5
    # a wrong prune is still caught through the fallback
    with torch.no_grad():
        small.mix.w[0, 0] += 1
    with pytest.raises(surgery.VerificationError):
        surgery.verify(model, small, plan, x)
