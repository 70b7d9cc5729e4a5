"""ultralytics YOLO, stock classes built from their yaml (no weights, no network), pruned through
the generic mechanisms: the executing tracer, attribute sizes (C2f/C2PSA split sections, PSA
heads), the head's outputs pinned because they are the model's outputs.

ultralytics (AGPL-3.0) is an optional extra and a test dependency: without it these tests skip.
``yolov8n`` runs in the default suite, the other yamls behind the slow marker.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_unchanged, snapshot

import surgery
from surgery.spec import SpecError, build_model


@pytest.fixture(autouse=True)
def _ultralytics() -> None:
    """Imported by the tests that run, not at collection: importing ultralytics patches
    PIL.Image.open for the whole process."""
    pytest.importorskip("ultralytics")

YAMLS = [pytest.param("yolov8n.yaml"),
         pytest.param("yolov8n-seg.yaml", marks=pytest.mark.slow),
         pytest.param("yolov8n-cls.yaml", marks=pytest.mark.slow),
         pytest.param("yolo11n.yaml", marks=pytest.mark.slow),
         pytest.param("yolov8n-pose.yaml", marks=pytest.mark.slow)]


def flat(out: object) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for v in out for t in flat(v)] if isinstance(out, tuple | list) else []


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(f"ultralytics:{name}").eval()
    size = 64 if "cls" in name else 128
    return model, torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", YAMLS)
def test_yolo_prunes_exactly_and_exports(name: str, tmp_path) -> None:
    model, x = _build(name)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert report.passed and report.exact_checked, report.message
    assert_unchanged(model, before)
    assert surgery.count_params(small) < 0.6 * surgery.count_params(model)
    assert surgery.count_macs(small, x) < 0.6 * surgery.count_macs(model, x)
    # the raw head outputs keep their channels: every output has the original's shape
    with torch.no_grad():
        want, got = model(x), small(x)
    assert [t.shape for t in flat(got)] == [t.shape for t in flat(want)]
    # train-mode forward (the loss path) runs on the pruned model
    small.train()
    flat(small(torch.cat([x, x])))[0].sum().backward()
    small.eval()
    # ONNX export with ONNX Runtime parity
    onnx_report = surgery.export_onnx(small, x, tmp_path / "small.onnx")
    assert onnx_report.max_rel_error < 1e-3
    # saved and reloaded from its spec
    surgery.save(tmp_path / "art", small, plan, spec=f"ultralytics:{name}",
                 input_shape=tuple(x.shape))
    again = surgery.load(tmp_path / "art").eval()
    with torch.no_grad():  # (the training step above moved the BatchNorm statistics)
        torch.testing.assert_close(flat(again(x))[0], flat(small(x))[0])


def test_yolo_attribute_sizes_are_rewritten() -> None:
    """yolo11's C2PSA splits into (self.c, self.c) and its PSA attention views by num_heads."""
    model, x = _build("yolo11n.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = surgery.plan(model, x, ratio=0.5)
    changes = {k: (a, b) for k, a, b in plan.attribute_changes()}
    assert any(k.endswith(".c") and b < a for k, (a, b) in changes.items())
    assert any(k.endswith("attn.num_heads") and 1 <= b < a for k, (a, b) in changes.items())
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).passed


def test_ultralytics_weights_files_are_refused() -> None:
    with pytest.raises(SpecError, match="yaml"):
        build_model("ultralytics:yolov8n.pt")
