"""Killing `surgery prune --out DIR` at any moment leaves the old DIR or the complete new one, and
no temp directory of ours survives the next run; SIGTERM cleans up at once, like Ctrl-C."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import surgery
from surgery.atomic import recover

SCRIPT = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
SHAPE = (1, 3, 32, 32)


def _old_artifact(out: Path) -> str:
    model = surgery.spec.build_model("resnet20")
    plan = surgery.plan(model, torch.randn(*SHAPE), ratio=0.25)
    surgery.save(out, surgery.apply(model, plan), plan, spec="resnet20", input_shape=SHAPE)
    return json.loads((out / "artifact.json").read_text())["pruned_fingerprint"]


def _ours(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _wait_for(pred, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("the prune never reached the point to kill it at")
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("point", ["planning", "writing", "weights written"])
def test_kill_leaves_old_or_new_and_nothing_behind(tmp_path: Path, sig: int, point: str) -> None:
    out = tmp_path / "r20"
    old = _old_artifact(out)
    proc = subprocess.Popen([SCRIPT, "prune", "resnet20", "--ratio", "0.5", "--input-shape",
                             "1,3,32,32", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        if point == "planning":
            time.sleep(1.0)
        else:
            target = "" if point == "writing" else "weights.safetensors"
            _wait_for(lambda: proc.poll() is not None or any(
                (tmp_path / n / target).exists() for n in _ours(out) if ".tmp-" in n))
        proc.send_signal(sig)
    finally:
        proc.wait(timeout=120)
    # the old directory or the complete new one, never nothing, never half of one
    small = surgery.load(out)
    fp = json.loads((out / "artifact.json").read_text())["pruned_fingerprint"]
    assert fp == old or small.conv1.out_channels == 8
    if sig == signal.SIGTERM and proc.returncode != 0:
        assert _ours(out) == [], "SIGTERM must clean up like Ctrl-C"
    # the next run (any save, or reading the directory) cleans what a killed one left
    recover(out)
    assert _ours(out) == []
    res = subprocess.run([SCRIPT, "prune", "resnet20", "--ratio", "0.5", "--input-shape",
                          "1,3,32,32", "--out", str(out), "--no-onnx"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert _ours(out) == [] and surgery.load(out).conv1.out_channels == 8


def test_a_swap_killed_between_renames_is_put_back(tmp_path: Path) -> None:
    """Where the atomic exchange is not available, two renames are used; a directory left
    aside by a kill between them is restored by the next reader."""
    out = tmp_path / "r20"
    old = _old_artifact(out)
    aside = tmp_path / ".r20.old-999999999-abc"  # a pid that cannot be running
    aside.mkdir()
    out.rename(aside / "x")
    (tmp_path / ".r20.tmp-999999999-def").mkdir()
    assert not out.exists()
    meta = surgery.artifact.read_meta(out)  # reading the directory restores it
    assert meta["pruned_fingerprint"] == old and _ours(out) == []
