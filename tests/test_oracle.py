"""Cross-checks against Torch-Pruning (our peer, used here as an oracle) and against verify()."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision
from conftest import assert_unchanged, randomize_norms, rounding, snapshot

import surgery
from surgery.plan import AxisPlan, LayerPlan, Plan


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121"])
def test_same_structure_as_torch_pruning(name: str) -> None:
    """Where both tools prune every group uniformly, the pruned sizes must agree exactly."""
    tp = pytest.importorskip("torch_pruning")
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.get_model(name, weights=None)
    ours = surgery.prune(model, x, ratio=0.5, round_to=1)
    theirs = torchvision.models.get_model(name, weights=None)
    fc = [m for m in theirs.modules() if isinstance(m, torch.nn.Linear)][-1]
    tp.pruner.MetaPruner(theirs, x, importance=tp.importance.MagnitudeImportance(p=2),
                         pruning_ratio=0.5, ignored_layers=[fc]).step()
    widths = [(type(m).__name__, getattr(m, "out_channels", None))
              for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [(type(m).__name__, m.out_channels)
                      for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert surgery.count_params(ours) == surgery.count_params(theirs)


def _tamper(plan: Plan, layer: str, axis: str) -> Plan:
    """Keep different channels in one layer than in the rest of its group."""
    layers = dict(plan.layers)
    ap = layers[layer].axes[axis]
    others = [i for i in range(ap.size) if i not in ap.keep]
    keep = tuple(sorted(others[: len(ap.keep)]))
    layers[layer] = LayerPlan(layers[layer].kind, layers[layer].cls,
                              {**layers[layer].axes, axis: AxisPlan(ap.size, keep)})
    return Plan(plan.model_class, plan.fingerprint, layers, plan.exact, plan.settings)


def test_verify_catches_an_inconsistent_plan() -> None:
    model = randomize_norms(torchvision.models.resnet18(weights=None))
    x = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model, x, ratio=0.5)
    bad = _tamper(plan, "layer1.0.bn1", "features")
    small = surgery.apply(model, bad)  # shapes still fit: only verification can tell
    report = surgery.verify(model, small, bad, x, raise_on_failure=False)
    assert not report.passed and report.max_rel_error > 1e-3
    with pytest.raises(surgery.VerificationError, match="differ from the zeroed original"):
        surgery.verify(model, small, bad, x)


def _small_error_prune(delta: float) -> tuple[torch.nn.Module, torch.nn.Module, Plan, torch.Tensor]:
    """A wrong prune whose error is about ``delta`` relative: conv2 reads removed channel r where
    it should read the adjacent kept channel k, and channel r equals channel k but for a factor
    1 + delta on its conv weights (so only verification, and only a fine one, can tell)."""
    torch.manual_seed(0)
    model = randomize_norms(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())).eval()
    x = torch.randn(1, 3, 16, 16)
    plan = surgery.plan(model, x, ratio=0.5)
    keep = plan.layers["3"].axes["in"].keep
    k, r = next((k, r) for k in keep for r in (k - 1, k + 1) if 0 <= r < 16 and r not in keep)
    with torch.no_grad():
        model[0].weight[r] = model[0].weight[k] * (1 + delta)
        model[0].bias[r] = model[0].bias[k]
        for t in (model[1].weight, model[1].bias, model[1].running_mean, model[1].running_var):
            t[r] = t[k]
    layers = dict(plan.layers)
    ap = layers["3"].axes["in"]
    layers["3"] = LayerPlan(layers["3"].kind, layers["3"].cls,
                            {"in": AxisPlan(ap.size, tuple(sorted({*keep} - {k} | {r})))})
    bad = Plan(plan.model_class, plan.fingerprint, layers, plan.exact, plan.settings)
    return model, surgery.apply(model, bad), bad, x


def test_verify_catches_a_wrong_prune_of_small_error() -> None:
    """A mismatch of ~1e-4 relative is far above float32 rounding: the one float32 pass sees it
    and float64 confirms it."""
    model, small, bad, x = _small_error_prune(1e-3)
    report = surgery.verify(model, small, bad, x, raise_on_failure=False)
    assert not report.passed and report.dtype == "torch.float64"
    assert 3e-5 < report.max_rel_error < 1e-3
    with pytest.raises(surgery.VerificationError, match="differ from the zeroed original"):
        surgery.verify(model, small, bad, x)
    # just above the default rtol: float32 alone could not tell it from rounding, float64 does
    model, small, bad, x = _small_error_prune(6e-6)
    report = surgery.verify(model, small, bad, x, raise_on_failure=False)
    assert not report.passed and 1e-6 < report.max_rel_error < 1e-5


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_float32_rounding_does_not_fail_a_deep_net(name: str) -> None:
    """A correct prune of a deep net passes; in float32 alone where rounding stays under rtol,
    and where it does not (rtol far below float32's resolution) float64 decides, passing."""
    from conftest import assert_unchanged, snapshot

    model = randomize_norms(torchvision.models.get_model(name, weights=None)).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    small.train()
    before, before_small = snapshot(model), snapshot(small)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.max_rel_error <= rounding(model)
    assert report.layers_compared >= 2
    strict = surgery.verify(model, small, plan, x, rtol=1e-12)
    assert strict.passed and strict.dtype == "torch.float64" and strict.max_rel_error < 1e-12
    # neither model changed: the pruned one ran in place (flags, buffers and hooks put back)
    assert_unchanged(model, before)
    assert_unchanged(small, before_small)
    assert small.training and all(not m._forward_hooks for m in small.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_verify_with_a_module_held_outside_modules() -> None:
    """A layer also held in a plain attribute (a list) cannot share a light copy's tensors:
    the reference is a full copy, and a wrong prune is still caught."""
    model, small, bad, x = _small_error_prune(1e-2)
    model.__dict__["alias"] = [model[3]]
    assert not surgery.verify(model, small, bad, x, raise_on_failure=False).passed
    plan = surgery.plan(model, x, ratio=0.5)
    assert surgery.verify(model, surgery.apply(model, plan), plan, x).passed


def test_float32_rounding_decides_a_deep_net_in_one_pass() -> None:
    """vgg11 has no normalisation and wide fan-ins: its estimated float32 rounding is 1.4e-5.
    A difference above 1e-6 but under that (how large float32 rounding of a correct prune gets
    depends on the CPU's kernels; here a last layer scaled by 1 + 5e-6 stands in for it) is
    decided by the one float32 pass (no float64 copies). A given rtol applies to both passes:
    then float64 decides, and sees the scaling."""
    verify_module = importlib.import_module("surgery.verify")
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    rounding = verify_module.float32_rounding(model)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.dtype == "torch.float32" and report.max_rel_error < rounding
    assert surgery.verify(model, small, plan, x, rtol=1e-6).passed  # in float64 if need be
    with torch.no_grad():
        small.classifier[6].weight.mul_(1 + 5e-6)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.dtype == "torch.float32"
    assert 1e-6 < report.max_rel_error < rounding < 1e-4
    strict = surgery.verify(model, small, plan, x, rtol=1e-6, raise_on_failure=False)
    assert not strict.passed and strict.dtype == "torch.float64" and strict.max_rel_error > 1e-6
    # a wrong prune is far above rounding: the float32 pass sends it to float64, which fails it
    bad = _tamper(plan, "features.3", "out")
    report = surgery.verify(model, surgery.apply(model, bad), bad, x, raise_on_failure=False)
    assert not report.passed and report.dtype == "torch.float64" and report.max_rel_error > 1e-3


class _OwnForward(torch.nn.Conv2d):
    """A conv subclass with its own forward: it may read its input differently, so the reference
    zeroes its weights rather than its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3)
        self.bn = torch.nn.BatchNorm2d(16)
        self.grouped = torch.nn.Conv2d(16, 16, 3, groups=4)
        self.own = _OwnForward(16, 16, 1)
        self.up = torch.nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.fc = torch.nn.Linear(16 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.c1(x)).relu()
        h = self.own(self.grouped(input=h).relu())  # a layer called with its input by keyword
        return self.fc(self.up(h).relu().flatten(1))


def test_reference_zeroes_inputs_instead_of_copying_weights() -> None:
    """Where a layer's rule says zeroing its input does what zeroing the weights that read it
    does (a conv, grouped or transposed, or a linear layer after a flatten, each with its own
    forward), the light reference shares the weights and zeroes those inputs on the way in: the
    same outputs as zeroing weights, no copy. A subclass with its own forward gets its weights
    copied and zeroed. Where a layer's weights are smaller than its input, the first call copies
    and zeroes the weights instead (fewer values copied), never the user's. The user's model
    carries no hook afterwards."""
    from surgery.verify import zeroed_reference

    model = randomize_norms(_Layers()).eval()
    x = torch.randn(1, 3, 12, 12)
    plan = surgery.plan(model, x, ratio=0.5)
    before = snapshot(model)
    assert {"c1", "grouped", "own", "up", "fc"} <= set(plan.layers)
    masked = zeroed_reference(model, plan, share_tensors=True)
    zeroed = zeroed_reference(model, plan, mask_inputs=False)
    for name in ("grouped", "own", "up", "fc"):  # each reads removed channels
        assert not torch.equal(getattr(zeroed, name).weight, getattr(model, name).weight), name
    for name in ("c1", "grouped", "up", "fc"):
        assert getattr(masked, name).weight is getattr(model, name).weight, name
    assert masked.own.weight is not model.own.weight
    assert torch.equal(masked.own.weight, zeroed.own.weight)
    with torch.no_grad():
        want, got, original = zeroed(x), masked(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # grouped: 592 weights against 1600 input values; up and fc: more weights than inputs
    assert masked.grouped.weight is not model.grouped.weight
    assert torch.equal(masked.grouped.weight, zeroed.grouped.weight)
    assert masked.up.weight is model.up.weight and masked.fc.weight is model.fc.weight
    assert_unchanged(model, before)
    assert not torch.allclose(got, original, rtol=1e-3, atol=1e-3)  # the zeroing mattered
    assert surgery.verify(model, surgery.apply(model, plan), plan, x).passed
    assert all(not m._forward_pre_hooks for m in model.modules())


class _Selects(torch.nn.Module):
    """A forward that chooses on a value (like top-k or NMS): a change of rounding size in ``h``
    flips the choice and doubles the output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3)
        self.c2 = torch.nn.Conv2d(16, 16, 3)
        self.fc = torch.nn.Linear(16, 4)
        self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(self.c1(x).relu())
        chosen = 1.0 + (h.sum() > self.threshold).float()
        return self.fc(h.mean((2, 3))) * chosen


def test_a_selection_flipped_by_rounding_is_checked_layer_by_layer() -> None:
    """When float32 rounding flips a choice (the threshold sits exactly on the reference's value
    and the pruned model's is a rounding above it), the outputs differ; verify then compares each
    layer given the reference's outputs of the layers before it, which passes in float32 and
    says so. A wrong prune still fails."""
    from surgery.verify import zeroed_reference

    torch.manual_seed(0)
    model = _Selects().eval()
    x = torch.randn(1, 3, 12, 12)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    assert "c2" in plan.layers and plan.exact
    ref = zeroed_reference(model, plan)
    with torch.no_grad():
        h = ref.c2(ref.c1(x).relu())
    small = surgery.apply(model, plan)
    with torch.no_grad():
        model.threshold.fill_(h.sum().item())
        small.threshold.fill_(h.sum().item())
        small.c2.bias += 1e-7 * h.abs().max()  # a rounding-sized change, upward
        assert not torch.allclose(small(x), model(x), rtol=0.1)  # the choice flipped
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.dtype == "torch.float32" and report.layer_by_layer
    assert 0 < report.max_rel_error <= 1e-6 and "layer by layer" in report.checked
    bad = _tamper(plan, "c1", "out")
    report = surgery.verify(model, surgery.apply(model, bad), bad, x, raise_on_failure=False)
    assert not report.passed and report.max_rel_error > 1e-3


def test_replace_tensors_keeps_the_containers() -> None:
    """Layer outputs are replaced in place of the pruned model's own, whatever holds them."""
    import collections

    from surgery.tensors import output_tensors, replace_tensors

    pair = collections.namedtuple("pair", "a b")
    out = {"x": pair(torch.zeros(1), [torch.ones(2), 3]), "y": (torch.ones(3),)}
    new = [torch.full((1,), 7.0), torch.full((2,), 8.0), torch.full((3,), 9.0)]
    got = replace_tensors(out, iter(new))
    assert isinstance(got["x"], pair) and got["x"].b[1] == 3 and isinstance(got["y"], tuple)
    assert all(a is b for a, b in zip(output_tensors(got), new, strict=True))
    assert out["x"].a.item() == 0  # the original structure is not modified


def test_outputs_rewritten_in_place_are_compared_as_returned() -> None:
    """resnet18 rewrites layer outputs in place (``ReLU(inplace=True)``, ``out += identity``).
    The reference keeps no copies of its layer outputs: one that a later in-place op rewrote is
    not compared (the next layer's output is), so a correct prune passes in the one float32 pass
    rather than failing on stale values, and a wrong prune is still caught. The residual
    streams are kept (ignore=) so that every block's bn2 output keeps its shape and is compared
    before ``+=`` rewrites it."""
    model = randomize_norms(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model, x, ratio=0.5, ignore=["conv1", r"re:layer\d\.0\.downsample\.0"])
    assert set(plan.layers["layer1.0.conv2"].axes) == {"in"}  # its output keeps its shape
    report = surgery.verify(model, surgery.apply(model, plan), plan, x)
    assert report.passed and report.dtype == "torch.float32" and report.layer_by_layer
    assert report.layers_compared > 20
    bad = _tamper(plan, "layer1.0.conv2", "in")  # reads other channels than bn1 keeps
    report = surgery.verify(model, surgery.apply(model, bad), bad, x, raise_on_failure=False)
    assert not report.passed and report.max_rel_error > 1e-3


def test_a_nan_output_fails_verification() -> None:
    """NaN compares false with every tolerance: a pruned model that returns NaN where the
    reference does not must fail, not pass with an error of NaN."""
    from surgery.tensors import rel_error

    want = torch.ones(3)
    assert rel_error(torch.tensor([1.0, float("nan"), 1.0]), want) == float("inf")
    assert rel_error(want, want) == 0.0
