"""Sizes the forward reads from attributes: attention heads, split sections, reshape dims.

Small hand-written modules pin down the mechanism (an attribute used as a size is rewritten, a
literal is refused naming its line, heads go whole and never all); real transformers
(torchvision ViT / Swin / MaxViT, timm) and nn.MultiheadAttention check it end to end.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_unchanged, rounding, snapshot
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import surgery
from surgery.report import prune_report, to_markdown
from surgery.rules.attention import PrunedMultiheadAttention


class Heads(nn.Module):
    """timm-style attention: fused qkv, ``num_heads`` and ``head_dim`` attributes."""

    def __init__(self, dim: int = 32, heads: int = 4, literal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.literal = heads, dim // heads, literal
        self.inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * self.inner)
        self.proj = nn.Linear(self.inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if self.literal:
            qkv = self.qkv(x).reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)  # literal sizes
        else:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1,
                                                                                     4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.inner))


class SplitBlock(nn.Module):
    """ultralytics C2f-style: ``split((self.c, self.c), 1)`` with ``c`` an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.c = 8
        self.cv1 = nn.Conv2d(3, 2 * self.c, 1)
        self.m = nn.Conv2d(self.c, self.c, 3, padding=1)
        self.cv2 = nn.Conv2d(3 * self.c, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat([a, b, self.m(b).relu()], 1))


class Tokens(nn.Module):
    """A class token joined along the token dim, then attention heads and a per-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 32))
        self.attn = Heads()
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return self.fc(self.attn(t)[:, 0])


def _check(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> tuple[surgery.Plan,
                                                                          nn.Module]:
    model.eval()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small modules: the network input and output are most
        plan = surgery.plan(model, x, ratio=ratio, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed, report.message
    assert_unchanged(model, before)
    assert surgery.count_params(small) < surgery.count_params(model)
    return plan, small


def test_heads_are_removed_whole_and_num_heads_rewritten() -> None:
    torch.manual_seed(0)
    model = Heads()
    plan, small = _check(model, torch.randn(2, 5, 32))
    assert plan.exact
    assert ("num_heads", 4, 2) in [(k, a, b) for k, a, b in plan.attribute_changes()]
    assert small.num_heads == 2 and small.head_dim == 8 and small.inner == 16
    assert small.qkv.out_features == 3 * 16 and small.proj.in_features == 16
    assert model.num_heads == 4 and type(model.num_heads) is int  # the original is untouched
    # the kept heads are whole: q rows of a kept head are all there
    keep = plan.layers["qkv"].axes["out"].keep
    heads = {i // 8 for i in keep if i < 32}
    assert len(heads) == 2 and all(h * 8 + j in keep for h in heads for j in range(8))


def test_every_head_cannot_go() -> None:
    model = Heads()
    plan, small = _check(model, torch.randn(1, 5, 32), ratio=0.99)
    assert small.num_heads == 1
    said = [w for w in plan.settings["warnings"] if "num_heads" in w]
    assert said and "keeps 1 of 4 units of 24 channels" in said[0] and "ratio 0.99" in said[0]
    # the prune report says so too
    x = torch.randn(1, 5, 32)
    report = prune_report(model, small, plan, x, surgery.verify(model, small, plan, x),
                          spec="Heads")
    assert "keeps 1 of 4" in to_markdown(report)
    # at a ratio that leaves a head by its own rounding, nothing is said
    plan, _ = _check(Heads(), torch.randn(1, 5, 32), ratio=0.5)
    assert not [w for w in plan.settings.get("warnings", []) if "keeps 1 of" in w]


class SingleHead(nn.Module):
    """SHViT-style: q, k, v split from one conv + BatchNorm by attribute sizes, q/k summed over."""

    def __init__(self) -> None:
        super().__init__()
        self.qk_dim, self.pdim = 8, 6
        self.qkv = nn.Sequential(nn.Conv2d(6, 2 * self.qk_dim + self.pdim, 1),
                                 nn.BatchNorm2d(2 * self.qk_dim + self.pdim))
        self.proj = nn.Conv2d(self.pdim, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        attn = (q.flatten(2).transpose(-2, -1) @ k.flatten(2)).softmax(-1)
        return self.proj((v.flatten(2) @ attn.transpose(-2, -1)).reshape(b, self.pdim, h, w))


def test_query_key_width_is_pruned_but_not_called_exact() -> None:
    """Removing a q/k channel pair changes the attention scores (a BatchNorm bias keeps the
    channel non-zero in the zeroed reference), so the plan is not exact; ``exact=True`` keeps the
    q/k width and still removes v channels, exactly."""
    torch.manual_seed(0)
    model = SingleHead()
    with torch.no_grad():  # trained-like BatchNorm: non-zero shifts
        model.qkv[1].bias.uniform_(-1, 1)
        model.qkv[1].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 6, 5, 5)
    plan, small = _check(model, x)
    assert not plan.exact and small.qk_dim == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strict = surgery.plan(model.eval(), x, ratio=0.5, round_to=1, exact=True)
    assert strict.exact and ("pdim", 6, 3) in strict.attribute_changes()
    assert not [c for c in strict.attribute_changes() if c[0] == "qk_dim"]
    small = surgery.apply(model, strict)
    report = surgery.verify(model, small, strict, x)
    assert report.exact_checked and report.max_rel_error <= rounding(model)


def test_split_sections_mix_attributes_and_held_sizes() -> None:
    """``split([self.p, self.dim - self.p])``: the second size is computed from attributes that
    must then stay, so its section keeps its channels, and the message says why."""

    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dim, self.p = 8, 4
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p, rest = self.a(x).split([self.p, self.dim - self.p], 1)
            return self.c(torch.cat([self.b(p), rest], 1))

    graph = surgery.trace(Partial().eval(), torch.randn(1, 3, 4, 4))
    why = graph.explain("a")
    assert "computed from widths or attributes that must stay" in why and "self.dim - self.p" \
        in why


def test_literal_head_count_is_refused_with_its_line() -> None:
    model = Heads(literal=True).eval()
    graph = surgery.trace(model, torch.randn(1, 5, 32))
    why = graph.explain("qkv")
    assert "hard-coded size" in why and "test_attention.py" in why and "reshape(b, n, 3, 4, 8)" \
        in why
    assert not graph.attrs


def test_split_sections_sized_by_an_attribute() -> None:
    torch.manual_seed(0)
    plan, small = _check(SplitBlock(), torch.randn(1, 3, 8, 8))
    assert plan.exact and small.c == 4 and small.cv1.out_channels == 8
    assert plan.attribute_changes() == [("c", 8, 4)]
    # the plan is data: JSON round trip, re-applied to a fresh instance
    again = surgery.apply(SplitBlock().eval(), surgery.Plan.from_json(plan.to_json()))
    assert again.c == 4


def test_class_token_joins_tokens_without_pinning_the_embedding() -> None:
    torch.manual_seed(0)
    model = Tokens()
    graph = surgery.trace(model.eval(), torch.randn(1, 6, 12))
    out = [line for line in graph.explain("embed").splitlines() if line.startswith("embed:out")]
    assert out and out[0].endswith(" 0 pinned")
    plan, small = _check(model, torch.randn(1, 6, 12))
    assert small.cls_token.shape[-1] == small.embed.out_features < 32
    assert small.attn.num_heads == 2


def test_report_lists_rewritten_attributes() -> None:
    from surgery.report import prune_report, to_markdown

    torch.manual_seed(0)
    model = SplitBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = prune_report(model, small, plan, x, surgery.verify(model, small, plan, x),
                          spec="SplitBlock")
    assert "`c: 8 → 4`" in to_markdown(report)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_prunes_heads(batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
            self.out = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            y, _ = self.mha(h, h, h, need_weights=need_weights)
            return self.out(y)

    model = Net()
    plan, small = _check(model, torch.randn(2, 7, 8))
    assert isinstance(small.mha, nn.MultiheadAttention)
    assert isinstance(small.mha, PrunedMultiheadAttention)
    assert small.mha.num_heads == 2 and small.mha.head_dim == 8
    assert plan.exact
    # masks work on the pruned layer as on the original (equal to the zeroed reference)
    from surgery.verify import zeroed_reference

    ref = zeroed_reference(model, plan)
    h = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    hs = h[..., list(plan.layers["mha"].axes["in"].keep)] if "in" in plan.layers["mha"].axes \
        else h
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    want, _ = ref.mha(h, h, h, key_padding_mask=pad, need_weights=False)
    got, _ = small.mha(hs, hs, hs, key_padding_mask=pad, need_weights=False)
    keep_out = list(plan.layers["mha"].axes["out"].keep) if "out" in plan.layers["mha"].axes \
        else list(range(32))
    torch.testing.assert_close(got, want[..., keep_out], atol=1e-5, rtol=1e-4)


def _transformer_check(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> surgery.Plan:
    plan, small = _check(model, x, ratio)
    assert surgery.count_macs(small, x) < 0.75 * surgery.count_macs(model, x)
    small.train()
    small(torch.cat([x, x])).sum().backward()  # trainable
    assert all(p.grad is not None for p in small.parameters() if p.requires_grad)
    return plan


def test_vit_b_16_heads_and_mlps() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    plan = _transformer_check(model, torch.randn(1, 3, 224, 224))
    heads = [(k, a, b) for k, a, b in plan.attribute_changes()]
    layers = plan.layers
    mha = layers["encoder.layers.encoder_layer_0.self_attention"]
    assert "heads" in mha.axes and len(mha.axes["heads"].keep) == 6 * 64
    assert heads  # the embedding width the forward reshapes to is rewritten (hidden_dim)


@pytest.mark.parametrize("name", ["swin_t", "maxvit_t"])
def test_torchvision_transformers(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    _transformer_check(model, torch.randn(1, 3, 224, 224))


def test_torchvision_swin_head_width_follows_the_embedding() -> None:
    """torchvision's ``shifted_window_attention`` computes the head width as ``C // num_heads``
    from its input: every head keeps, each narrows with the embedding (the window shift, the
    q/k/v slabs and the mask are followed), about 3/4 of the parameters go."""
    torch.manual_seed(0)
    model = torchvision.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).passed and not plan.exact
    attn = small.features[1][0].attn
    width = small.features[1][0].norm1.normalized_shape[0]
    assert attn.num_heads == 3 and width < 96 and width % 3 == 0
    assert attn.qkv.out_features == 3 * width and attn.proj.in_features == width
    assert surgery.count_params(small) < 0.4 * surgery.count_params(model)


def test_timm_deit_heads() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    plan = _transformer_check(model, torch.randn(1, 3, 224, 224))
    changes = {k: (a, b) for k, a, b in plan.attribute_changes()}
    assert changes["blocks.0.attn.num_heads"] == (3, 2)
    assert changes["blocks.0.attn.attn_dim"] == (192, 128)


def test_tracing_leaves_attributes_as_plain_ints() -> None:
    model = Heads().eval()
    saved = copy.deepcopy(vars(model))
    surgery.trace(model, torch.randn(1, 5, 32))
    for k, v in saved.items():
        if type(v) is int:
            assert type(vars(model)[k]) is int and vars(model)[k] == v


def test_macs_count_a_parameter_handed_to_a_submodule() -> None:
    """timm's PiT passes its class token into a submodule as is; counting MACs must not fail
    (and must leave requires_grad as it was)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.token) + x

    net = Net()
    assert surgery.count_macs(net, torch.randn(1, 2)) == 8
    assert all(p.requires_grad for p in net.parameters())


def test_exact_keeps_the_embedding_width() -> None:
    """By default a ViT's embedding width is pruned through LayerNorm (not exact); exact=True keeps
    it, removing heads and MLP width only, and the result is exactly equivalent."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                              depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    loose = surgery.plan(model, x, ratio=0.5)
    strict = surgery.plan(model, x, ratio=0.5, exact=True)
    assert not loose.exact and strict.exact and strict.settings["exact"]
    small = surgery.apply(model, strict)
    report = surgery.verify(model, small, strict, x)
    assert report.exact_checked and report.max_rel_error <= rounding(model)
    assert small.blocks[0].attn.num_heads == 2 and small.blocks[0].mlp.fc1.out_features < 768
    assert small.patch_embed.proj.out_channels == 192  # the embedding width stays


def test_split_by_a_size_computed_from_the_same_tensor_follows_it() -> None:
    """``y.split(y.size(1) // 2, 1)``: the size follows y's width, so nothing is pinned."""

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 16, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            p, q = y.split(y.size(1) // 2, 1)
            return self.c(torch.cat([p, self.b(q)], 1))

    plan, small = _check(Half(), torch.randn(1, 3, 8, 8))
    assert plan.exact and small.a.out_channels == 8 and small.b.in_channels == 4


class BatchHeads(nn.Module):
    """BoTNet-style: heads folded into the batch dim (``B * self.num_heads``) and a
    relative-position table shared by every head, contracted with each head's queries."""

    def __init__(self, dim: int = 16, heads: int = 4, width: int = 4, tokens: int = 6,
                 literal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.dim_head, self.literal = heads, width, literal
        self.dim_out = heads * width
        self.qkv = nn.Conv1d(dim, 3 * self.dim_out, 1)
        self.table = nn.Parameter(torch.randn(tokens, width))
        self.proj = nn.Conv1d(self.dim_out, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n = x.shape
        q, k, v = torch.split(self.qkv(x), [self.dim_out] * 3, dim=1)
        heads = 4 if self.literal else self.num_heads
        q = q.reshape(b * heads, self.dim_head, -1).transpose(-1, -2)
        k = k.reshape(b * heads, self.dim_head, -1)
        v = v.reshape(b * heads, self.dim_head, -1).transpose(-1, -2)
        attn = (q @ k) * 0.5 + q @ self.table.transpose(0, 1)  # (b·heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(-1, -2).reshape(b, self.dim_out, n)
        return self.proj(out) + x


def test_heads_folded_into_the_batch_dim_are_removed() -> None:
    """``reshape(B * self.num_heads, ...)``: the size follows num_heads, whatever the batch; the
    table shared by the heads keeps its width (no head loses part of it), and the result is
    exact at another batch size too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 1), BatchHeads(), nn.Conv1d(16, 2, 1))
    plan, small = _check(model, torch.randn(2, 3, 6))
    assert plan.exact
    assert ("1.num_heads", 4, 2) in plan.attribute_changes()
    assert small[1].num_heads == 2 and small[1].dim_out == 8 and small[1].qkv.out_channels == 24
    assert small[1].table.shape == (6, 4)
    x3 = torch.randn(3, 3, 6)
    ref = surgery.verify(model, small, plan, x3)
    assert ref.passed and ref.exact_checked


def test_heads_folded_into_the_batch_by_a_literal_stay() -> None:
    """``reshape(B * 4, ...)``: a literal head count cannot follow, so every head stays; each
    head's width (and the shared table's columns) shrinks by the same positions instead."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 1), BatchHeads(literal=True), nn.Conv1d(16, 2, 1))
    plan, small = _check(model, torch.randn(2, 3, 6))
    assert not any(k.endswith("num_heads") for k, _, _ in plan.attribute_changes())
    keep = plan.layers["1.qkv"].axes["out"].keep
    width = small[1].table.shape[1]
    assert width < 4 and small[1].qkv.out_channels == 3 * 4 * width
    per_head = [sorted(i % 4 for i in keep if i // 4 == h) for h in range(12)]
    assert all(p == per_head[0] for p in per_head)  # the same positions in every head


class WidthFromInput(nn.Module):
    """Twins/PVT-style: the head width is the *input* width over the heads
    (``C // self.num_heads``), and the output is reshaped back to ``C``."""

    def __init__(self, dim: int = 16, heads: int = 2, fused: bool = False) -> None:
        super().__init__()
        self.num_heads, self.scale, self.fused = heads, (dim // heads) ** -0.5, fused
        self.norm = nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), \
            nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        b, n, c = y.shape
        q = self.q(y).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(y).reshape(b, -1, 2, self.num_heads, c // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:  # no scale given: 1/sqrt(the head width)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            return x + self.proj(out)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return x + self.proj(out)


def test_head_width_computed_from_the_input_width_follows_the_embedding() -> None:
    """The heads stay; each head's width shrinks with the embedding (the same positions in every
    head), ``self.scale`` keeps its value; with exact=True the embedding and heads stay whole."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), WidthFromInput(), WidthFromInput(), nn.Linear(16, 3))
    x = torch.randn(2, 7, 5)
    plan, small = _check(model, x)
    assert not plan.exact  # the embedding passes LayerNorm
    c = small[0].out_features
    assert c < 16 and c % 2 == 0
    for blk in (small[1], small[2]):
        assert blk.num_heads == 2 and blk.q.out_features == c and blk.kv.out_features == 2 * c
        assert blk.scale == (16 // 2) ** -0.5
        keep = plan.layers["1.q"].axes["out"].keep
        assert [i - 8 for i in keep if i >= 8] == [i for i in keep if i < 8]  # same in each head
    small.train()
    small(torch.randn(3, 4, 5)).pow(2).mean().backward()
    strict = surgery.plan(model, x, ratio=0.5, round_to=1, exact=True)
    assert "1.q" not in strict.layers or "out" not in strict.layers["1.q"].axes


def test_a_scale_computed_from_the_width_is_not_exact() -> None:
    """``h * h.size(1) ** -0.5``: the scale changes when channels go, so the plan says it is not
    exact (verification then checks shapes), and exact=True keeps those channels."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h * h.size(1) ** -0.5)

    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(1, 3, 6, 6)
    plan, small = _check(model, x)
    assert not plan.exact and small.a.out_channels < 8
    strict = surgery.plan(model, x, ratio=0.5, round_to=1, exact=True)
    assert "a" not in strict.layers


def test_fused_attention_without_scale_narrows_heads_not_exactly() -> None:
    """``scaled_dot_product_attention(q, k, v)`` scales by 1/sqrt(head width): a head that
    narrows with the embedding changes that temperature, so the plan is not exact; heads that
    go whole (timm's ViT) stay exact (test_exact_keeps_the_embedding_width)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), WidthFromInput(fused=True), nn.Linear(16, 3))
    x = torch.randn(2, 7, 5)
    plan, small = _check(model, x)
    assert not plan.exact and small[1].num_heads == 2 and small[1].q.out_features < 16
    strict = surgery.plan(model, x, ratio=0.5, round_to=1, exact=True)
    assert "1.q" not in strict.layers or "out" not in strict.layers["1.q"].axes


def test_heads_inferred_from_minus_one_go_whole() -> None:
    """``view(B, N, -1, self.head_dim)``: the head count follows by itself, so whole heads go
    (exact) and ``head_dim`` keeps its value."""

    class Inferred(Heads):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            q, k, v = (t.view(b, n, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
            attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
            out = (attn.softmax(-1) @ v).transpose(1, 2)
            return self.proj(out.reshape(b, n, -1))

    torch.manual_seed(0)
    plan, small = _check(Inferred(), torch.randn(2, 5, 32))
    assert plan.exact and small.head_dim == 8 and small.qkv.out_features == 3 * 16


def test_layers_called_with_keyword_arguments() -> None:
    """A layer's inputs passed by keyword bind to its forward's parameters as if positional
    (``self.mha(query=q, key=k, value=v)``): the heads are pruned and the pruned model verifies.
    A tensor only a ``**kwargs`` takes, into a layer kept as it is, keeps its channels."""
    torch.manual_seed(0)

    class Mix(nn.Module):
        def forward(self, x: torch.Tensor, **extra: torch.Tensor) -> torch.Tensor:
            return x + extra["y"]

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.kv = nn.Linear(8, 32), nn.Linear(8, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.a, self.b = nn.Linear(8, 16), nn.Linear(8, 16)
            self.mix = Mix()
            self.out = nn.Linear(48, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = self.kv(x)
            y, _ = self.mha(query=self.q(x), key=kv, value=kv, need_weights=False)
            m = self.mix(self.a(x), y=self.b(x))
            return self.out(torch.cat([y, m], -1))

    model = Net()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = surgery.plan(model, x, ratio=0.5, round_to=1, ignore=["mix"])
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).passed
    assert small.mha.num_heads < 4 and small.q.out_features == small.kv.out_features < 32
    assert small.a.out_features == small.b.out_features == 16  # into the kept layer: whole
    graph = surgery.trace(model, x, ignore=["mix"])
    assert "through **kwargs" in graph.explain("b")


@pytest.mark.parametrize("tracer", ["fx", "run"])
def test_multihead_attention_with_a_mask_per_head_keeps_its_heads(tracer: str) -> None:
    """A 3-D attn_mask holds one mask per head (batch * num_heads of them): the heads stay, the
    model verifies, and explain says why; a buffer (symbolic trace) or made in forward from the
    input's shape (which torch.fx cannot trace: the forward is run)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 32)
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.out = nn.Linear(32, 3)
            self.register_buffer("mask", torch.zeros(2 * 4, 5, 5))
            self.mask[::2, :, -1] = float("-inf")  # every other head ignores the last position

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            mask = self.mask
            if tracer == "run":
                mask = torch.zeros(x.shape[0] * 4, x.shape[1], x.shape[1])
                mask[::2, :, -1] = float("-inf")
            y, _ = self.mha(h, h, h, attn_mask=mask, need_weights=False)
            return self.out(y)

    model = Net()
    x = torch.randn(2, 5, 8)
    plan, small = _check(model, x)
    assert small.mha.num_heads == 4
    graph = surgery.trace(model, x)
    assert graph.tracer == tracer and "one attention mask per head" in graph.explain("mha")


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "resnet18"])
def test_macs_match_torchvisions_published_count(name: str) -> None:
    """torchvision states each model's GFLOPs (as multiply-accumulates) in its weights' metadata
    (no download): the count agrees to its three decimals. ViT-B/16 counted 11.27 before, its
    attention unseen (nn.MultiheadAttention's eval fast path, and scaled_dot_product_attention's
    CPU kernel, are opaque to torch's flop counter)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    model = torchvision.models.get_model(name, weights=None).eval()
    macs = surgery.count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs / 1e9 - weights.meta["_ops"]) <= 6e-4
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def test_macs_of_fused_attention_layers() -> None:
    """A TransformerEncoderLayer in eval runs one fused kernel: its MACs counted 0 before. Now:
    the four projections, the two attention products and the feed-forward."""
    d, heads, ff, n = 64, 4, 128, 10
    layer = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True).eval()
    want = n * (4 * d * d + 2 * d * ff) + 2 * n * n * d
    assert surgery.count_macs(layer, torch.randn(1, n, d)) == want
    q = torch.randn(1, heads, n, d // heads)
    sdpa = surgery.count_macs(_Call(F.scaled_dot_product_attention), (q, q, q))
    assert sdpa == 2 * n * n * d


class _Call(nn.Module):
    """A module that calls one function."""

    def __init__(self, fn: object) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.fn(*args)  # type: ignore[operator]


class _ReadsValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.offset = torch.ones(8)  # a plain tensor attribute, on the CPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 2 if float(y.sum()) > 0 else self.fc(y + self.offset)


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "mobilenet_v3_small"])
def test_macs_on_shapes_equal_macs_on_values(name: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """Large models are counted on the meta device: the same total and per-module counts as a
    real forward, and the model is left as it was."""
    from surgery import stats

    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    before = snapshot(model)
    monkeypatch.setattr(stats, "ON_SHAPES", 10**12)
    real_total, real_modules = surgery.count_macs(model, x), stats.module_macs(model, x)
    monkeypatch.setattr(stats, "ON_SHAPES", 0)
    counter = FlopCounterMode(display=False)
    assert stats._on_meta(model, (x,), counter)  # the shapes path is the one taken
    assert surgery.count_macs(model, x) == real_total > 0
    assert stats.module_macs(model, x) == real_modules
    assert_unchanged(model, before)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_macs_fall_back_to_values_where_the_forward_reads_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery import stats

    monkeypatch.setattr(stats, "ON_SHAPES", 0)
    model = _ReadsValues().eval()
    x = torch.randn(3, 8)
    assert not stats._on_meta(model, (x,), FlopCounterMode(display=False))
    with torch.no_grad():
        branches = 2 if float(model.fc(x).sum()) <= 0 else 1
    assert surgery.count_macs(model, x) == branches * 3 * 8 * 8
