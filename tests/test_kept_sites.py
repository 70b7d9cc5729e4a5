"""Cross-channel ops on pruned channels: the reference runs them on the kept channels alone, so
verification still compares values (and catches a wrong prune) where it used to compare shapes."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from conftest import assert_unchanged, randomize_norms, snapshot
from torch import nn

import surgery
from surgery.api import prune_in_steps
from surgery.plan import Plan


class _Block(nn.Module):
    """A transformer-style MLP block: pre-norm over the embedding, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class _Norm2d(nn.Module):
    """A hand-written channels-first LayerNorm: statistics over dim 1 in the forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _Gate(nn.Module):
    """A spatial gate from the channel max (CBAM), and a normalised embedding."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(torch.max(x, 1, keepdim=True).values)
        return nn.functional.normalize(x * gate, dim=1)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), _Block(16), _Block(16), nn.LayerNorm(16),
                          nn.Linear(16, 3))
    randomize_norms(model)
    return model.eval()


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Norm2d(16), nn.GELU(),
                         nn.Conv2d(16, 16, 1), nn.GroupNorm(1, 16), _Gate(16),
                         nn.Conv2d(16, 4, 1)).eval()


class _SharedNorm(nn.Module):
    """One LayerNorm called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.mid(self.norm(self.inp(x)))))


def _shared() -> nn.Module:
    torch.manual_seed(0)
    model = _SharedNorm()
    randomize_norms(model)
    return model.eval()


@pytest.mark.parametrize("make, x", [(_vit, torch.randn(2, 5, 6)),
                                     (_convnet, torch.randn(1, 3, 8, 8)),
                                     (_shared, torch.randn(2, 5, 6))])
def test_cross_channel_ops_are_verified_by_value(make, x) -> None:
    model = make()
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert_unchanged(model, before)
    assert not plan.exact and plan.kept_sites  # not equal to the zeroed original ...
    # ... but to the original with each norm and statistic over the kept channels alone
    assert report.passed and report.exact_checked and report.kept_sites == len(plan.kept_sites)
    assert report.max_rel_error < 1e-5 and "cross-channel ops" in report.checked
    # the plan is data: the sites survive JSON, and re-applied they verify the same
    again = Plan.from_json(plan.to_json())
    assert again.kept_sites == plan.kept_sites
    assert surgery.verify(model, surgery.apply(make(), again), again, x).exact_checked


def test_the_sites_of_a_plan_name_where_each_op_runs() -> None:
    model = _convnet()
    x = torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert plan.kept_sites is not None
    where = {s.where[0] if s.where[0] == "module" else s.where[3] for s in plan.kept_sites}
    # the two means of the hand-written norm, the one-group GroupNorm layer, the channel max
    # of the gate and the normalisation
    assert where == {"mean", "module", "max", "normalize"}
    for site in plan.kept_sites:
        assert 0 < len(site.keep) < site.size
        if site.where[0] == "call":
            assert site.where[1] == "test_kept_sites.py" and site.calls >= 1  # portable


@pytest.mark.parametrize("make, x", [(_vit, torch.randn(2, 5, 6)),
                                     (_convnet, torch.randn(1, 3, 8, 8))])
def test_a_wrong_prune_behind_a_norm_is_caught(make, x) -> None:
    """Before, these plans were checked by shapes only: a pruned model that keeps the wrong
    channel of a norm's weight passed."""
    model = make()
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    norm = next(m for m in small.modules() if isinstance(m, nn.LayerNorm | nn.GroupNorm))
    with torch.no_grad():
        norm.weight[0] += 0.5  # as if the surgery had taken another channel's weight
    with pytest.raises(surgery.VerificationError, match="differ"):
        surgery.verify(model, small, plan, x)


class _TwoMeans(nn.Module):
    """A line that makes one more ``mean`` call in the forward than the trace sees (on a tensor
    made in the forward, which fx turns into a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x - x.mean(1, keepdim=True) + torch.ones(1).mean()
        return self.out(x)


def test_calls_the_trace_did_not_see_fall_back_to_shapes() -> None:
    model = _TwoMeans().eval()
    x = torch.randn(1, 3, 4, 4)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert plan.kept_sites and plan.kept_sites[0].calls == 1
    report = surgery.verify(model, surgery.apply(model, plan), plan, x)
    # the reference's calls did not match the trace's: no values are compared on a guess
    assert report.passed and not report.exact_checked and report.kept_sites == 0
    assert "did not match the trace's" in report.checked


def test_a_scale_computed_from_the_width_is_still_checked_by_shapes() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h * h.shape[-1] ** -0.5)

    model = Scaled().eval()
    x = torch.randn(2, 4)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert not plan.exact and plan.kept_sites is None
    report = surgery.verify(model, surgery.apply(model, plan), plan, x)
    # the report names the op and the line that keep it from comparing values
    assert not report.exact_checked and report.checked.startswith("output shapes only: `mul`")
    assert "test_kept_sites.py" in report.checked and "h * h.shape[-1]" in report.checked


@pytest.mark.parametrize("fused", [False, True])
def test_attention_over_narrower_heads_is_verified_by_value(fused: bool) -> None:
    """Every head keeps and narrows with the embedding: q·k sums over fewer positions (and fused
    attention's default scale follows the width), so the plan is not exact; the reference sums
    over the kept positions alone, and a wrong query weight is caught."""
    from test_attention import WidthFromInput

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), WidthFromInput(fused=fused), nn.Linear(16, 3)).eval()
    randomize_norms(model)
    x = torch.randn(2, 7, 5)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert not plan.exact and small[1].q.out_features < 16
    assert report.passed and report.exact_checked and report.kept_sites >= 2
    names = {s.where[3] for s in plan.kept_sites or () if s.where[0] == "call"}
    assert names == {"scaled_dot_product_attention" if fused else "matmul"}
    with torch.no_grad():
        small[1].q.weight[0] += 0.1
    with pytest.raises(surgery.VerificationError, match="differ"):
        surgery.verify(model, small, plan, x)


class _Causal(nn.Module):
    """Attention written with positional options and ``torch.bmm(..., mat2=...)``."""

    def __init__(self, bmm: bool) -> None:
        super().__init__()
        self.bmm = bmm
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.bmm:
            attn = torch.bmm(q, mat2=k.transpose(1, 2)).softmax(-1)
            return self.out(torch.bmm(attn, v))
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        y = nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], mask)
        return self.out(y[:, 0])


@pytest.mark.parametrize("bmm", [False, True])
def test_attention_options_given_by_position_reach_the_reference(bmm: bool) -> None:
    """The reference's attention keeps the mask given by position (else a right prune would
    fail), and ``mat2=`` is ``bmm``'s second operand."""
    torch.manual_seed(0)
    model = _Causal(bmm).eval()
    x = torch.randn(2, 5, 6)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert not plan.exact and small.q.out_features == 4
    assert report.passed and report.exact_checked and report.kept_sites


def test_an_op_its_rule_cannot_run_on_kept_channels_falls_back_to_shapes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.rules import function_rule

    def refuse(*args: object) -> None:
        raise ValueError("not this form")

    monkeypatch.setattr(function_rule("mean"), "on_kept", refuse)
    model = _convnet()
    x = torch.randn(1, 3, 8, 8)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    report = surgery.verify(model, surgery.apply(model, plan), plan, x)
    assert report.passed and not report.exact_checked
    assert "could not run on the kept channels" in report.checked


def test_a_site_the_model_does_not_have_falls_back_to_shapes() -> None:
    """A plan edited by hand names a layer this model lacks: shapes only, said, no crash."""
    model = _vit()
    x = torch.randn(2, 5, 6)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    d = plan.to_dict()
    site = next(s for s in d["kept_sites"] if s["where"][0] == "module")
    site["where"][1] = "no.such.layer"
    edited = Plan.from_dict(d)
    report = surgery.verify(model, surgery.apply(model, edited), edited, x)
    assert report.passed and not report.exact_checked and "no.such.layer" in report.checked


_MOVED = '''
import torch
from torch import nn


class Net(nn.Module):
    """Channel statistics in the forward: call sites, found again by file and line."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-5)
        return self.fc2(h)
'''


def _installed(where, monkeypatch: pytest.MonkeyPatch) -> type[nn.Module]:
    """``Net`` imported from its own copy of the source under ``where``, as a library installed
    there (another machine, virtualenv or container)."""
    where.mkdir()
    (where / "moved_net.py").write_text(_MOVED)
    monkeypatch.delitem(sys.modules, "moved_net", raising=False)
    monkeypatch.syspath_prepend(str(where))
    return importlib.import_module("moved_net").Net


def test_a_plan_saved_elsewhere_is_verified_by_value(tmp_path, monkeypatch) -> None:
    """Call sites name their file relative to its sys.path entry: a plan saved where the model's
    library lay in one place verifies by value where the same source lies in another."""
    x = torch.randn(2, 5, 6)
    torch.manual_seed(0)
    here = _installed(tmp_path / "here", monkeypatch)().eval()
    plan = surgery.plan(here, x, ratio=0.5, round_to=1)
    assert plan.kept_sites and all(s.where[1] == "moved_net.py" for s in plan.kept_sites)
    saved = Plan.from_json(plan.to_json())
    monkeypatch.syspath_prepend(str(tmp_path))  # a shorter root must not win over the longer
    torch.manual_seed(0)
    there = _installed(tmp_path / "there", monkeypatch)().eval()
    assert str(tmp_path / "there") in sys.modules["moved_net"].__file__
    report = surgery.verify(there, surgery.apply(there, saved), saved, x)
    assert report.passed and report.exact_checked and report.kept_sites == len(saved.kept_sites)
    # a plan from before (absolute paths) is still found in the environment that made it
    old = plan.to_dict()
    for s in old["kept_sites"]:
        s["where"][1] = str(tmp_path / "there" / "moved_net.py")
    old_plan = Plan.from_dict(old)
    assert surgery.verify(there, surgery.apply(there, old_plan), old_plan, x).exact_checked


@pytest.mark.parametrize("make, x", [(_vit, torch.randn(2, 5, 6)),
                                     (_convnet, torch.randn(1, 3, 8, 8))])
def test_a_plan_made_in_steps_is_verified_by_value_as_a_whole(make, x) -> None:
    """The plan of several prunes, chained (``Plan.then``), keeps their kept-channel sites: the
    whole, re-applied to the original, is compared by value, and a wrong prune is caught."""
    model = make()
    total, small, last = prune_in_steps(model, x, surgery.Uniform(0.5, round_to=1), 2)
    assert last.exact_checked and total.kept_sites
    again = Plan.from_json(total.to_json())
    rebuilt = surgery.apply(make(), again)
    report = surgery.verify(model, rebuilt, again, x)
    assert report.passed and report.exact_checked and report.kept_sites == len(total.kept_sites)
    torch.testing.assert_close(rebuilt(x), small(x))
    with torch.no_grad():  # a kept channel's weight changed: a wrong prune
        next(p for p in rebuilt.parameters() if p.dim() >= 2)[0].add_(0.5)
    assert not surgery.verify(model, rebuilt, again, x, raise_on_failure=False).passed


class _Centring(nn.Module):
    """A layer whose helper method its parent calls directly (not as a layer call)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.centred(x)


class _CallsAHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 16), _Centring(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm.centred(torch.relu(self.fc1(x)))  # runs in this layer's scope
        return self.fc2(self.norm(h))  # a layer call: in the child's scope


def test_a_childs_method_called_directly_runs_in_its_callers_scope() -> None:
    torch.manual_seed(0)
    model, x = _CallsAHelper().eval(), torch.randn(2, 5, 6)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert plan.kept_sites is not None
    assert sorted(s.scope for s in plan.kept_sites) == ["", "norm"]
    report = surgery.verify(model, surgery.apply(model, plan), plan, x)
    assert report.passed and report.exact_checked and report.kept_sites == 2
