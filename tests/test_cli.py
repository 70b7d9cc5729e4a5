"""The real `surgery` console script, in subprocesses: results, exit codes, messages, no debris."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import messages

import surgery
from surgery import cli

SCRIPT = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
SHAPE = ["--input-shape", "1,3,32,32"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "r20"
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(str(out))
    return out


def test_help_has_examples() -> None:
    res = run("--help")
    assert res.returncode == 0 and "inspect" in res.stdout and "bench" in res.stdout
    for cmd in ("inspect", "prune", "export", "bench", "apply"):
        res = run(cmd, "--help")
        assert res.returncode == 0 and "Examples:" in res.stdout, cmd
        # one example per line, not rewrapped into one run-together paragraph
        first = cli.EXAMPLES[cmd].splitlines()[0]
        assert any(line.strip() == first.strip() for line in res.stdout.splitlines()), cmd
    assert "Timed runs per model" in run("bench", "--help").stdout


def test_apply_a_saved_plan_to_a_fresh_model(artifact_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    res = run("apply", "resnet20", str(artifact_dir / "plan.json"), *SHAPE, "--out", str(out),
              "--no-onnx")
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "artifact.json").read_text())
    assert meta["pruned_fingerprint"] == json.loads(
        (artifact_dir / "artifact.json").read_text())["pruned_fingerprint"]
    assert json.loads((out / "report.json").read_text())["verification"]["exact"]
    res = run("apply", "resnet56", str(artifact_dir / "plan.json"), *SHAPE, "--out",
              str(tmp_path / "wrong"))
    assert res.returncode == 1 and "made for another architecture" in res.stderr
    assert not (tmp_path / "wrong").exists()


def test_a_plan_inconsistent_with_the_model_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    doc = json.loads((artifact_dir / "plan.json").read_text())
    conv, bn = doc["layers"]["conv1"]["axes"]["out"], doc["layers"]["bn1"]["axes"]["features"]
    assert conv["keep"] == bn["keep"]
    bn["keep"] = sorted([*conv["keep"][:-1], min(set(range(conv["size"])) - set(conv["keep"]))])
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    res = run("apply", "resnet20", str(tmp_path / "plan.json"), *SHAPE, "--out",
              str(tmp_path / "out"))
    assert res.returncode == 1, res.stderr
    lines = messages(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert "bn1:features[" in lines[0] and "conv1:out[" in lines[0] and "same channel" in lines[0]
    assert not (tmp_path / "out").exists()
    # the same plan in a saved directory, its hash updated to match: refused on load
    bad = _copy(artifact_dir, tmp_path / "bad")
    (bad / "plan.json").write_text(json.dumps(doc))
    meta = json.loads((bad / "artifact.json").read_text())
    meta["files"]["plan.json"] = hashlib.sha256((bad / "plan.json").read_bytes()).hexdigest()
    (bad / "artifact.json").write_text(json.dumps(meta))
    res = run("bench", str(bad), "--runtime", "torch")
    assert res.returncode == 1 and "plan.json: the plan is inconsistent" in res.stderr
    assert "bn1:features[" in res.stderr and len(messages(res.stderr)) == 1


def test_prune_writes_a_complete_safe_artifact(artifact_dir: Path) -> None:
    names = sorted(p.name for p in artifact_dir.iterdir())
    assert names == ["artifact.json", "model.onnx", "plan.json", "report.json", "report.md",
                     "weights.safetensors"]
    assert not [p for p in artifact_dir.parent.iterdir() if p.name.startswith(".")]
    report = json.loads((artifact_dir / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["exact"]
    assert report["params"]["after"] < 0.3 * report["params"]["before"]
    assert report["layers"]["conv1"] == {"before": [16, 3, 3, 3], "after": [8, 3, 3, 3]}
    # no pickle: the weights are safetensors, everything else is JSON/Markdown/ONNX
    assert (artifact_dir / "weights.safetensors").read_bytes()[8:9] == b"{"
    # surgery.load rebuilds it, and it agrees with the exported ONNX file
    small = surgery.load(artifact_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    sess = surgery.export.ort_session(artifact_dir / "model.onnx", threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], small(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_bench_export_inspect(artifact_dir: Path, tmp_path: Path) -> None:
    res = run("bench", str(artifact_dir), "--runtime", "torch,ort", "--rounds", "2",
              "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
              "--plot", str(tmp_path / "b.png"))
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        ("resnet20", "torch"), (f"{artifact_dir} (pruned)", "torch"), ("resnet20", "ort"),
        (f"{artifact_dir} (pruned)", "ort")]
    assert rows[1]["mac_ratio"] > 3 and "| resnet20 | torch | 1 |" in res.stdout
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    res = run("export", str(artifact_dir), "--onnx", str(tmp_path / "m.onnx"))
    assert res.returncode == 0 and "relative error" in res.stdout
    res = run("bench", str(tmp_path / "m.onnx"), "--runtime", "ort", "--rounds", "2", *SHAPE)
    assert res.returncode == 0, res.stderr
    res = run("-q", "inspect", "resnet20", *SHAPE, "--json")
    groups = json.loads(res.stdout)
    assert res.returncode == 0 and groups[0]["prunable"] is False and groups[1]["prunable"]
    assert groups[1]["channels"] == 16 and groups[1]["macs"] > 0


def test_progress_lines_when_not_a_terminal(artifact_dir: Path, tmp_path: Path) -> None:
    """Piped, stderr shows a plain line per step (a long bench is not silent); stdout only
    the results; -q none."""
    res = run("bench", str(artifact_dir), "--runtime", "torch,ort", "--rounds", "2",
              "--threads", "1", "--json", str(tmp_path / "b.json"))
    assert res.returncode == 0, res.stderr
    shown = [line for line in res.stderr.splitlines() if line.startswith("... ")]
    assert shown[:2] == ["... building the models", "... benchmarking"], res.stderr
    assert any(line.startswith("... timing 2 models on torch, batch 1") for line in shown)
    assert any(line.startswith("... timing 2 models on ort, batch 1") for line in shown)
    assert "| model | runtime |" in res.stdout and "..." not in res.stdout
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--dry-run")
    assert res.returncode == 0, res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("... ")] == [
        "... tracing and planning resnet20", "... rebuilding layers", "... verifying"]
    assert "..." not in res.stdout
    res = run("-q", "prune", "resnet20", "--ratio", "0.5", *SHAPE, "--dry-run")
    assert res.returncode == 0 and res.stderr == ""


def test_epoch_progress_is_throttled(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from surgery import console

    with console.Console().batches(2) as on_batch:  # stderr is captured: not a terminal
        assert on_batch is not None
        for _ in range(2):
            for step in range(1, 101):
                on_batch(step, 100, 0.5)
    assert capsys.readouterr().err == ""  # a fast run: no line per batch
    monkeypatch.setattr(console, "EVERY", 0.0)
    with console.Console().batches(2) as on_batch:
        assert on_batch is not None
        for _ in range(2):
            for step in range(1, 4):
                on_batch(step, 3, 0.25)
    assert capsys.readouterr().err.splitlines() == [
        f"... epoch {e}/2: batch {b}/3, loss 0.2500" for e in (1, 2) for b in (1, 2)]


@pytest.mark.parametrize(("args", "message"), [
    (["prune", "torchvision:nonet", "--ratio", "0.5", "--out", "OUT"], "has no model 'nonet'"),
    (["prune", "what:ever", "--ratio", "0.5", "--out", "OUT"], "unknown model spec 'what:ever'"),
    (["prune", "resnet20", "--ratio", "1.5", *SHAPE, "--out", "OUT"], "ratio must be a number"),
    (["prune", "resnet20", "--ratio", "0.5", "--input-shape", "1,3,x", "--out", "OUT"],
     "not a comma-separated list"),
    (["prune", "missing.py:build", "--ratio", "0.5", "--out", "OUT"], "does not exist"),
    (["bench", "missing.onnx"], "ONNX file missing.onnx does not exist"),
    (["export", "resnet20", *SHAPE, "--onnx", "no/such/dir/m.onnx"], "does not exist"),
    (["bench", "resnet20", "--runtime", "cuda", *SHAPE], "no CUDA GPU"),
    (["prune", "resnet20", "--target-macs", "0.5", "--allocate", "ort", *SHAPE, "--out", "OUT"],
     "--allocate ort needs --ratio"),
    (["bench", "resnet20", *SHAPE, "--json", "missing/b.json"], "folder missing does not exist"),
    (["bench", "resnet20", *SHAPE, "--plot", "."], "--plot . is a folder"),
    (["export", "resnet20", *SHAPE, "--onnx", "."], "--onnx . is a folder"),
    (["apply", "resnet20", "missing.json", *SHAPE, "--out", "OUT"], "cannot read plan file"),
    (["bench", "resnet20", "--input-shape", "1,4,32,32", "--runtime", "torch"],
     "fails on an input of shape (1, 4, 32, 32)"),
])
def test_user_errors(args: list[str], message: str, tmp_path: Path) -> None:
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(messages(res.stderr)) == 1 and messages(res.stderr)[0].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_artifacts(artifact_dir: Path, tmp_path: Path) -> None:
    bad = _copy(artifact_dir, tmp_path / "plan")
    (bad / "plan.json").write_text((bad / "plan.json").read_text().replace("[", "[0,", 1))
    res = run("bench", str(bad), "--runtime", "torch")
    assert res.returncode == 1 and "plan.json does not match the hash" in res.stderr

    bad = _copy(artifact_dir, tmp_path / "trunc")
    data = (bad / "weights.safetensors").read_bytes()
    (bad / "weights.safetensors").write_bytes(data[: len(data) // 2])
    res = run("export", str(bad), "--onnx", str(tmp_path / "x.onnx"))
    assert res.returncode == 1 and "weights.safetensors does not match" in res.stderr
    assert not (tmp_path / "x.onnx").exists()

    bad = _copy(artifact_dir, tmp_path / "arch")
    meta = json.loads((bad / "artifact.json").read_text())
    meta["spec"] = "resnet56"
    (bad / "artifact.json").write_text(json.dumps(meta))
    res = run("bench", str(bad), "--runtime", "torch")
    assert res.returncode == 1 and "different architecture" in res.stderr

    bad = _copy(artifact_dir, tmp_path / "json")
    (bad / "artifact.json").write_text("{")
    res = run("bench", str(bad), "--runtime", "torch")
    assert res.returncode == 1 and "artifact.json is corrupted" in res.stderr

    res = run("bench", str(tmp_path), "--runtime", "torch")
    assert res.returncode == 1 and "artifact.json is missing" in res.stderr


def test_prune_refuses_to_clobber_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--out", str(tmp_path))
    assert res.returncode == 1 and "not a surgery artifact directory" in res.stderr
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--dry-run", cwd=tmp_path)
    row = "| layers.0.conv1 | [16, 16, 3, 3] | [8, 8, 3, 3] |"
    assert res.returncode == 0 and row in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_latency_aware_allocation(tmp_path: Path) -> None:
    res = run("prune", "resnet20", "--ratio", "0.5", *SHAPE, "--allocate", "ort", "--threads",
              "1", "--out", str(tmp_path / "r20"), "--no-onnx")
    assert res.returncode == 0, res.stderr
    plan = surgery.Plan.load(tmp_path / "r20" / "plan.json")
    assert plan.settings["runtime"] == "ort"
    # the laid-out plan was timed against the uniform one on ORT and the faster kept
    compared = plan.settings["compared"]
    laid_out_won = compared["laid_out_ms"] <= compared["uniform_ms"]
    assert compared["kept"] == ("laid out" if laid_out_won else "uniform")
    assert plan.settings["allocation"] == ("latency" if laid_out_won else "uniform")
    report = json.loads((tmp_path / "r20" / "report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["exact"]


def test_depth_blocks_scored_on_data_while_timing_the_example_batch(tmp_path: Path) -> None:
    out = tmp_path / "deep"
    res = run("prune", "resnet20", "--ratio", "0.5", "--input-shape", "1,3,8,8", "--allocate",
              "ort", "--depth", "--data", "digits", "--samples", "8", "--no-onnx",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "reading 8 images of digits" in res.stdout + res.stderr
    plan = surgery.Plan.load(out / "plan.json")
    assert plan.settings["config"]["batch"] == 1  # timed at the example's batch, not at 8
    if "compared" in plan.settings and "skipped" not in plan.settings["compared"]:
        assert plan.settings["compared"]["batch"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["passed"]
    res = run("prune", "resnet20", "--ratio", "0.5", "--input-shape", "1,1,8,8", "--allocate",
              "ort", "--depth", "--data", "digits", "--dry-run")
    assert res.returncode == 1 and "gives images of shape (3, 8, 8)" in res.stderr
    assert "takes (1, 8, 8)" in res.stderr
    res = run("prune", "resnet20", "--ratio", "0.5", "--data", "digits", "--dry-run")
    assert res.returncode == 1 and "to score blocks for --depth" in res.stderr


def test_internal_error_exit_code(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli, "build_model", boom)
    assert cli.main(["inspect", "resnet20"]) == 2
    assert "internal error: RuntimeError: kaboom" in capsys.readouterr().err


def test_train_prune_again_finetune(tmp_path: Path) -> None:
    trained, half = tmp_path / "t", tmp_path / "h"
    res = run("train", "resnet20", "--data", "digits", "--size", "8", "--epochs", "1",
              "--out", str(trained))
    assert res.returncode == 0 and "epoch 1/1" in res.stdout, res.stderr
    res = run("-q", "prune", str(trained), "--ratio", "0.5", "--out", str(half), "--no-onnx")
    assert res.returncode == 0, res.stderr
    plan = surgery.Plan.load(half / "plan.json")  # one plan for the original architecture
    assert plan.fingerprint == surgery.fingerprint(surgery.spec.build_model("resnet20"))
    res = run("finetune", str(half), "--data", "digits", "--teacher", str(trained),
              "--epochs", "1", "--lr", "0.01")
    assert res.returncode == 0 and "val acc" in res.stdout, res.stderr
    small = surgery.load(half)
    assert small.conv1.out_channels == 8 and surgery.count_params(small) < 80_000
    (tmp_path / "empty").mkdir()
    res = run("finetune", str(half), "--data", str(tmp_path / "empty"), "--epochs", "1")
    assert res.returncode == 1 and "no class sub-folders" in res.stderr


def test_data_parallel_finetune_ranks_agree(artifact_dir: Path, tmp_path: Path) -> None:
    work = _copy(artifact_dir, tmp_path / "ddp")
    res = run("finetune", str(work), "--data", "digits", "--epochs", "1", "--nproc", "2",
              "--rank-hashes", str(tmp_path / "h"))
    assert res.returncode == 0, res.stderr
    h0, h1 = (tmp_path / "h.rank0").read_text(), (tmp_path / "h.rank1").read_text()
    assert h0 == h1 and h0.startswith("world=2 ")  # both ranks end with identical weights
    surgery.load(work)  # rank 0 saved a loadable artifact
    res = run("finetune", str(work), "--data", "digits", "--nproc", "99")
    assert res.returncode == 1 and "--nproc 99 is more than the" in res.stderr
    if not torch.cuda.is_available():
        res = run("finetune", str(work), "--data", "digits", "--device", "cuda")
        assert res.returncode == 1 and "no CUDA GPU" in res.stderr


def test_finetune_under_torchrun_ranks_agree(artifact_dir: Path, tmp_path: Path) -> None:
    """The multi-GPU launch path (torchrun, env:// rendezvous), here with gloo on the CPU."""
    work = _copy(artifact_dir, tmp_path / "tr")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2"]
    res = subprocess.run([*torchrun, "-m", "surgery.cli", "finetune", str(work), "--data",
                          "digits", "--epochs", "1", "--rank-hashes", str(tmp_path / "h")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    h0, h1 = (tmp_path / "h.rank0").read_text(), (tmp_path / "h.rank1").read_text()
    assert h0 == h1 and h0.startswith("world=2 ")  # one process group, identical weights
    assert res.stdout.count("epoch 1/1") == 1  # only rank 0 reports
    assert surgery.load(work).conv1.out_channels == 8


def test_iterative_pruning_in_steps(tmp_path: Path) -> None:
    out = tmp_path / "st"
    res = run("prune", "resnet20", "--ratio", "0.5", "--steps", "2", "--data", "digits",
              "--epochs", "1", "--input-shape", "1,3,8,8", "--round-to", "1", "--no-onnx",
              "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "step 1/2" in res.stdout and "step 2/2" in res.stdout
    small = surgery.load(out)
    # 16 -> 12 -> 8: 0.29 of the channels per step, the last step lands on --ratio's count
    assert small.conv1.out_channels == 8 and small.fc.in_features == 32
    res = run("prune", "resnet20", "--ratio", "0.5", "--steps", "2", "--dry-run")
    assert res.returncode == 1 and "--steps K needs --ratio and --data" in res.stderr
    res = run("prune", "resnet20", "--ratio", "1.5", "--steps", "2", "--data", "digits",
              "--dry-run")
    assert res.returncode == 1 and "ratio must be a number in [0, 1)" in res.stderr


def test_errors_name_flags_not_keyword_arguments(tmp_path: Path) -> None:
    """A library message that says ``ignore=['1']`` reaches the command line as ``--ignore 1``."""
    from surgery.cli import as_flags

    assert as_flags("pass ignore=['a.b', 'c'] to keep it") == \
        "pass --ignore a.b --ignore c to keep it"
    assert as_flags("round_to=8 could only reach; trust_code=True") == \
        "--round-to 8 could only reach; --trust-code"
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Mix(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.scale = nn.Parameter(torch.randn(8, 1, 1))\n\n"
        "    def forward(self, x):\n"
        "        return torch.addcmul(x, x, self.scale)\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), Mix(), nn.Conv2d(8, 2, 1))\n")
    res = run("prune", "net.py:make", "--ratio", "0.5", "--input-shape", "1,3,16,16", "--out",
              str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 1 and "--ignore 1" in res.stderr, res.stderr
    assert "ignore=[" not in res.stderr and not (tmp_path / "out").exists()
