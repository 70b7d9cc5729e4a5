"""ONNX export with parity, atomic files, and the benchmark harness's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
import torchvision
from conftest import messages
from patterns import PATTERNS

import surgery


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    return model, surgery.prune(model, x, ratio=0.5), x


def test_export_parity_and_smaller_file(pair, tmp_path) -> None:
    model, small, x = pair
    big = surgery.export_onnx(model, x, tmp_path / "big.onnx")
    little = surgery.export_onnx(small, x, tmp_path / "small.onnx")
    assert little.max_rel_error < 1e-4 and big.max_rel_error < 1e-4
    assert little.file_bytes < 0.4 * big.file_bytes
    for rep, m in ((big, model), (little, small)):
        # BatchNorm is folded into the convs: the graph holds the params less ~one BN vector each
        assert abs(rep.onnx_weights - surgery.count_params(m)) < 0.01 * surgery.count_params(m)
    onnx.checker.check_model(onnx.load(little.path))
    # dynamic batch axis: a batch of 3 runs in ONNX Runtime
    sess = surgery.export.ort_session(little.path, threads=1)
    out = sess.run(None, {"input": torch.randn(3, 3, 64, 64).numpy()})[0]
    assert out.shape == (3, 1000)
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "small.onnx"]


@pytest.mark.parametrize("name", ["grouped", "shuffle", "layer_scale", "concat"])
def test_patterns_export(name: str, tmp_path) -> None:
    cls, shape = PATTERNS[name]
    x = torch.randn(shape)
    small = surgery.prune(cls(), x, ratio=0.5)
    assert surgery.export_onnx(small, x, tmp_path / "m.onnx").max_rel_error < 1e-4


def test_export_to_missing_or_readonly_folder(pair, tmp_path) -> None:
    model, _, x = pair
    with pytest.raises(surgery.ExportError, match="folder .*nope does not exist"):
        surgery.export_onnx(model, x, tmp_path / "nope" / "m.onnx")
    (tmp_path / "file").write_text("")
    with pytest.raises(surgery.ExportError, match="file is a file, not a folder"):
        surgery.export_onnx(model, x, tmp_path / "file" / "m.onnx")
    # a folder nobody can create files in, root included (root passes every os.access check)
    ro = Path("/proc") if Path("/proc/self").is_dir() else None
    if ro is None:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        if os.access(ro, os.W_OK):
            pytest.skip("no /proc, and this user can write anywhere")
    with pytest.raises(surgery.ExportError, match=f"folder {ro} is not writable"):
        surgery.export_onnx(model, x, ro / "m.onnx")
    assert not [p for p in tmp_path.iterdir() if p.name not in ("file", "ro")]  # no debris
    res = subprocess.run([sys.executable, "-m", "surgery.cli", "export", "resnet20",
                          "--input-shape", "1,3,8,8", "--onnx", str(ro / "m.onnx")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 1 and messages(res.stderr) == [
        f"error: --onnx {ro / 'm.onnx'}: folder {ro} is not writable"], res.stderr


def test_failed_export_names_the_op_and_leaves_nothing(tmp_path) -> None:
    class Bad(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.svd(x.flatten(2))[1]

    target = tmp_path / "bad.onnx"
    target.write_bytes(b"old")  # a previous good file must survive a failed export
    with pytest.raises(surgery.ExportError, match="aten._linalg_svd"):
        surgery.export_onnx(Bad(), torch.randn(1, 3, 8, 8), target)
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["bad.onnx"]


def test_bench_report(pair) -> None:
    model, small, _ = pair
    report = surgery.bench({"orig": model, "pruned": small}, (3, 64, 64), runtimes=("torch", "ort"),
                           batches=(1, 2), threads=1, rounds=3, min_round_ms=1, warmup=1)
    assert [(r.model, r.runtime, r.batch) for r in report.rows] == [
        ("orig", "torch", 1), ("pruned", "torch", 1), ("orig", "torch", 2),
        ("pruned", "torch", 2), ("orig", "ort", 1), ("pruned", "ort", 1), ("orig", "ort", 2),
        ("pruned", "ort", 2)]
    for r in report.rows:
        assert 0 < r.median_ms <= r.p90_ms <= r.p99_ms and r.threads == 1
        if r.model == "pruned":
            assert r.mac_ratio == pytest.approx(report.rows[0].macs / r.macs)
            assert r.efficiency == pytest.approx(r.speedup / r.mac_ratio)
            assert r.onnx_bytes is None or r.onnx_bytes > 0
    assert report.rows[1].macs < report.rows[0].macs
    doc = json.loads(report.to_json())
    assert doc["env"]["threads"] == 1 and len(doc["rows"]) == 8
    assert report.to_csv().count("\n") == 9
    assert "| pruned | ort | 2 |" in report.to_markdown()
    assert "Medians" in report.to_markdown()


def test_bench_bad_runtime(pair) -> None:
    model, _, _ = pair
    with pytest.raises(surgery.ConfigError, match="unknown runtime 'tensorrt'"):
        surgery.bench({"m": model}, runtimes=("tensorrt",))
    if not torch.cuda.is_available():
        with pytest.raises(surgery.RuntimeMissingError, match="no CUDA GPU"):
            surgery.bench({"m": model}, runtimes=("cuda",))


def _zoo_params() -> list:
    from zoo import conv_nets

    few = {"mobilenet_v3_small", "shufflenet_v2_x0_5", "regnet_y_400mf", "squeezenet1_1"}
    return [pytest.param(n, marks=() if n in few else pytest.mark.slow) for n in conv_nets()]


@pytest.mark.parametrize("name", _zoo_params())
def test_zoo_exports_with_parity(name: str, tmp_path) -> None:
    from zoo import build

    torch.manual_seed(0)
    model, x = build(name)
    small = surgery.prune(model.eval(), x, ratio=0.5)
    big = surgery.export_onnx(model, x, tmp_path / "big.onnx", dynamic_batch=False)
    rep = surgery.export_onnx(small, x, tmp_path / "small.onnx")
    assert rep.max_rel_error < 1e-4 and rep.file_bytes < big.file_bytes


def test_missing_onnxruntime_is_a_clear_error(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    model, _, x = pair
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(surgery.RuntimeMissingError, match="needs onnxruntime: pip install"):
        surgery.bench({"m": model}, (3, 64, 64), runtimes=("ort",))
    with pytest.raises(surgery.RuntimeMissingError, match="onnxruntime is not installed"):
        surgery.export.ort_session("whatever.onnx")


def test_bench_under_a_busy_core_warns_and_fits_the_free_cores() -> None:
    """A spinning process on one core: the default thread count leaves it that core, the
    report records the load and warns when the threads asked for do not fit."""
    from surgery.bench import bench, busy_cores

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 10
        while busy_cores(0.2) < 0.7 and time.monotonic() < deadline:
            pass
        cores = os.cpu_count() or 1
        quiet_threads = bench({"m": model}, (3, 16, 16), runtimes=("torch",), rounds=3)
        assert quiet_threads.env["busy_cores_before"] >= 0.7
        assert quiet_threads.rows[0].threads == max(1, cores - 1)
        crowded = bench({"m": model}, (3, 16, 16), runtimes=("torch",), rounds=3,
                        threads=cores)
        assert "unreliable" in crowded.env["warning"]
        assert crowded.to_markdown().startswith("**warning**")
    finally:
        spin.kill()
        spin.wait()
