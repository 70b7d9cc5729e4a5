"""Flags and registries that had no test: each test fails if its feature were ignored.

The command line runs as ``python -m surgery.cli`` with this checkout first on PYTHONPATH (the
installed ``surgery`` script may point at another checkout).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import surgery
from surgery import latency, rules
from surgery.rules.cost import Call, ConvCost

criteria = importlib.import_module("surgery.criteria")  # surgery.criteria is the function
ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["--input-shape", "1,3,32,32"]


def run(*args: str, cwd: Path | None = None, columns: int = 200
        ) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def report(*args: str) -> dict[str, Any]:
    """The --json report of a dry run of ``prune resnet20 ...``."""
    res = run("prune", "resnet20", *SHAPE, "--dry-run", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 pruned by half (l2), saved without ONNX."""
    out = tmp_path_factory.mktemp("cov") / "l2"
    res = run("-q", "prune", "resnet20", "--ratio", "0.5", *SHAPE, "--out", str(out),
              "--no-onnx")
    assert res.returncode == 0, res.stderr
    return out


def test_runs_this_checkout() -> None:
    res = subprocess.run([sys.executable, "-c", "import surgery; print(surgery.__file__)"],
                         capture_output=True, text=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert Path(res.stdout.strip()) == ROOT / "surgery" / "__init__.py"


def test_file_factory_with_model_arg(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n"
        "def build(width=8):\n"
        "    return nn.Sequential(nn.Conv2d(3, int(width), 3, padding=1),\n"
        "                         nn.BatchNorm2d(int(width)), nn.ReLU(),\n"
        "                         nn.Conv2d(int(width), 4, 1))\n")
    out = tmp_path / "out"
    res = run("prune", f"{tmp_path / 'net.py'}:build", "--model-arg", "width=24", "--ratio",
              "0.5", "--round-to", "1", "--input-shape", "1,3,16,16", "--out", str(out),
              "--no-onnx", "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["layers"]["0"] == {"before": [24, 3, 3, 3], "after": [12, 3, 3, 3]}
    small = surgery.load(out, trust_code=True)
    assert small[0].out_channels == 12 and small[3].in_channels == 12
    assert json.loads((out / "artifact.json").read_text())["model_args"] == {"width": 24}


def test_debug_shows_the_traceback() -> None:
    plain = run("inspect", "resnet20", "--input-shape", "1,3,0,32")
    debug = run("--debug", "inspect", "resnet20", "--input-shape", "1,3,0,32")
    assert plain.returncode == debug.returncode == 1
    assert plain.stderr.startswith("error: --input-shape") and \
        len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr
    assert "Traceback (most recent call last)" in debug.stderr and "UserError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: --input-shape")


def test_prune_json() -> None:
    rep = report("--ratio", "0.5")
    assert rep["model"] == "resnet20" and rep["settings"]["ratio"] == 0.5
    assert rep["params"]["before"] > rep["params"]["after"] > 0
    assert rep["macs"]["before"] > rep["macs"]["after"] > 0
    assert rep["layers"]["conv1"] == {"before": [16, 3, 3, 3], "after": [8, 3, 3, 3]}
    assert rep["verification"]["passed"]


def test_target_macs() -> None:
    rep = report("--target-macs", "0.5")
    kept = rep["macs"]["after"] / rep["macs"]["before"]
    assert 0.4 <= kept <= 0.5, kept
    assert rep["settings"]["target_macs"] == 0.5


def test_ignore_keeps_the_layer_whole() -> None:
    rep = report("--ratio", "0.5", "--ignore", "conv1")
    assert "conv1" not in rep["layers"]  # unchanged layers are not listed
    assert rep["layers"] and rep["params"]["after"] < rep["params"]["before"]
    assert rep["settings"]["ignore"] == ["conv1"]
    # without --ignore, conv1 is pruned (test_prune_json): the flag made the difference


def test_criterion_changes_the_kept_channels(half: Path, tmp_path: Path) -> None:
    out = tmp_path / "random"
    res = run("-q", "prune", "resnet20", "--ratio", "0.5", *SHAPE, "--criterion", "random",
              "--out", str(out), "--no-onnx")
    assert res.returncode == 0, res.stderr
    l2, rnd = surgery.Plan.load(half / "plan.json"), surgery.Plan.load(out / "plan.json")
    assert l2.settings["criterion"] == "l2" and rnd.settings["criterion"] == "random"
    keep = {name: {a: p.keep for a, p in layer.axes.items()} for name, layer in l2.layers.items()}
    other = {name: {a: p.keep for a, p in layer.axes.items()} for name, layer in rnd.layers.items()}
    sizes = {n: {a: len(k) for a, k in axes.items()} for n, axes in keep.items()}
    assert sizes == {n: {a: len(k) for a, k in axes.items()} for n, axes in other.items()}
    assert keep != other  # same widths, other channels


def test_finetune_checkpoint(half: Path, tmp_path: Path) -> None:
    work, ckpt = tmp_path / "work", tmp_path / "ckpt"
    shutil.copytree(half, work)  # finetune saves back into its DIR
    res = run("finetune", str(work), "--data", "digits", "--size", "8", "--epochs", "1",
              "--checkpoint", str(ckpt))
    assert res.returncode == 0, res.stderr
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert (ckpt / "state.safetensors").is_file()


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_register_criterion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(criteria, "_CRITERIA", dict(criteria._CRITERIA))

    def last(model: nn.Module, graph: surgery.ChannelGraph, seed: int) -> Any:
        return lambda group: np.arange(len(group.units), dtype=float)  # later units score higher

    surgery.register_criterion("last", last)
    assert "last" in surgery.criteria()
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    p = surgery.plan(model, x, ratio=0.5, round_to=1, criterion="last")
    assert p.layers["0"].axes["out"].keep == (4, 5, 6, 7)
    assert surgery.plan(model, x, ratio=0.5, round_to=1).layers["0"].axes["out"].keep != \
        (4, 5, 6, 7)  # l2 on these weights keeps others: the criterion made the difference


class Sine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sin(self.a(x)))


def test_register_function_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "_FUNCTION_RULES", dict(rules._FUNCTION_RULES))
    torch.manual_seed(0)
    model, x = Sine().eval(), torch.randn(1, 3, 8, 8)

    def prunable() -> bool:
        return any(g.prunable for g in surgery.trace(model, x).groups)

    assert rules.function_rule(torch.sin) is None and not prunable()  # sin pins its input
    seen: list[str] = []

    def sine(ctx: surgery.RuleContext, args: tuple, kwargs: dict, out: Any) -> Any:
        seen.append("sin")
        return rules.passthrough(ctx, args[0], out)

    surgery.register_function_rule([torch.sin], sine)
    assert prunable() and seen
    small = surgery.prune(model, x, ratio=0.5, round_to=1)
    assert small.a.out_channels == 4 and small.b.in_channels == 4


class MyConv(nn.Conv2d):
    pass


class TenfoldCost(ConvCost):
    types = (MyConv,)

    def macs(self, call: Call[nn.Conv2d], w: dict[str, int]) -> float:
        return 10 * super().macs(call, w)


def test_register_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "_COSTS", list(latency._COSTS))
    torch.manual_seed(0)
    model = nn.Sequential(MyConv(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)

    def timer(call: Call, w: dict[str, int]) -> float:
        return 1.0

    with pytest.raises(ValueError, match="already has a cost model"):
        surgery.register_cost(TenfoldCost())  # MyConv inherits Conv2d's
    rule = surgery.register_cost(TenfoldCost(), replace=True)
    assert latency.cost_rule(MyConv) is rule and latency.cost_rule(nn.Conv2d) is not rule
    lat = surgery.latency_model(model, x, timer=timer)
    assert [c.path for c in lat.calls] == ["0", "2"] and lat.rules[0] is rule
    full = {"in": 3, "out": 8}
    assert lat.macs(0, full) == 10 * ConvCost().macs(lat.calls[0], full) == 10 * 8 * 8 * 27 * 8


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = surgery.spec.build_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    p = surgery.plan(model, x, ratio=0.5)
    small = surgery.apply(model, p).eval()
    target = surgery.save(tmp_path / "r20", small, p, spec="resnet20", input_shape=(1, 3, 32, 32))
    assert target == tmp_path / "r20" and (target / "plan.json").is_file()
    back = surgery.load(target).eval()
    assert back is not small and back.conv1.out_channels == small.conv1.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)
    assert surgery.Plan.load(target / "plan.json").layers.keys() == p.layers.keys()


def test_inspect_fits_the_terminal() -> None:
    res = run("inspect", "resnet20", *SHAPE, columns=80)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("conv1" in line for line in lines)
    assert max(len(line) for line in lines) <= 80


def test_prune_refuses_a_missing_parent_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "missing" / "DIR"
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--out", str(out), "--no-onnx")
    assert res.returncode == 1
    assert res.stderr.strip() == (f"error: --out {out}: folder {out.parent} does not exist; "
                                  "create it first")
    assert not (tmp_path / "a").exists()
    # before any work: no model is built (an unknown model would fail later than this)
    res = run("prune", "no_such_model", "--ratio", "0.5", "--out", str(out))
    assert res.returncode == 1 and f"folder {out.parent} does not exist" in res.stderr
