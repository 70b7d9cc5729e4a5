"""`./run demo` (``python -m surgery.demo``): it says where its plan and models went, and they
are there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx

import surgery

ROOT = Path(__file__).resolve().parents[1]


def test_demo_says_where_its_plan_and_models_went(tmp_path: Path) -> None:
    assert "demo) exec python -m surgery.demo" in (ROOT / "run").read_text()  # what ./run runs
    res = subprocess.run([sys.executable, "-m", "surgery.demo", "--size", "32", "--threads", "1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    out = tmp_path.resolve() / "out" / "demo"  # the default --out, in the caller's directory
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "resnet18-pruned.onnx",
                                                     "resnet18.onnx"]
    assert f"saved the plan: {out / 'plan.json'}" in res.stdout
    for name in ("resnet18", "resnet18-pruned"):
        assert f"exported {out / name}.onnx: " in res.stdout
        onnx.checker.check_model(str(out / f"{name}.onnx"))
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"plan and ONNX files: {re.escape(str(out))} \(\d+ MB; --out to move\)",
                        last), last
    assert "| resnet18-pruned |" in res.stdout  # the latency table
    plan = surgery.Plan.load(out / "plan.json")
    assert plan.model_class == "ResNet" and plan.settings["ratio"] == 0.5
