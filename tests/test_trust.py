"""A saved directory runs no code it names unless trusted; user model files load from anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import messages

import surgery
from surgery.artifact import UntrustedCodeError

SCRIPT = shutil.which("surgery", path=str(Path(sys.executable).parent)) or "surgery"
SHAPE = (1, 3, 16, 16)

EVIL = textwrap.dedent("""
    from pathlib import Path
    Path({marker!r}).write_text("ran")
    from surgery.spec import build_model
    def f(**kw):
        return build_model("resnet20")
""")

MYNET = textwrap.dedent("""
    import torch
    from torch import nn

    class MyNet(nn.Module):
        def __init__(self, width=16):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1)
            self.fc = nn.Linear(width, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean((2, 3)))

    def build(width=16):
        return MyNet(width)
""")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A genuine resnet20 artifact whose artifact.json was edited to name an evil model file
    that builds the very same architecture (so, if it ran, every later check would pass)."""
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "marker"
    (root / "evil.py").write_text(EVIL.format(marker=str(marker)))
    model = surgery.spec.build_model("resnet20")
    x = torch.randn(*SHAPE)
    plan = surgery.plan(model, x, ratio=0.5)
    d = surgery.save(root / "art", surgery.apply(model, plan), plan, spec="resnet20",
                     input_shape=SHAPE)
    meta = json.loads((d / "artifact.json").read_text())
    meta["spec"] = f"{root / 'evil.py'}:f"
    (d / "artifact.json").write_text(json.dumps(meta))
    return d, marker


def test_load_refuses_code_named_by_the_directory(crafted: tuple[Path, Path]) -> None:
    d, marker = crafted
    with pytest.raises(UntrustedCodeError, match="evil.py.*trust_code=True"):
        surgery.load(d)
    assert not marker.exists()
    # opting in runs it, which is what the default must prevent
    surgery.load(d, trust_code=True)
    assert marker.read_text() == "ran"
    marker.unlink()


@pytest.mark.parametrize("args", [
    ["inspect", "DIR", "--input-shape", "1,3,16,16"],
    ["prune", "DIR", "--ratio", "0.5", "--out", "OUT"],
    ["export", "DIR", "--onnx", "OUT.onnx"],
    ["bench", "DIR", "--runtime", "torch", "--rounds", "1"],
    ["sparsify", "DIR", "--amount", "0.5", "--out", "OUT.safetensors"],
    ["finetune", "DIR", "--data", "digits", "--epochs", "1"],
    ["finetune", "GOOD", "--teacher", "DIR", "--data", "digits", "--epochs", "1"],
])
def test_cli_refuses_code_named_by_the_directory(crafted: tuple[Path, Path], tmp_path: Path,
                                                 args: list[str]) -> None:
    d, marker = crafted
    good = tmp_path / "good"
    if "GOOD" in args:  # a harmless artifact to fine-tune, with the crafted one as teacher
        model = surgery.spec.build_model("resnet20")
        plan = surgery.plan(model, torch.randn(*SHAPE), ratio=0.25)
        surgery.save(good, surgery.apply(model, plan), plan, spec="resnet20", input_shape=SHAPE)
    subst = {"DIR": str(d), "GOOD": str(good), "OUT": str(tmp_path / "out"),
             "OUT.onnx": str(tmp_path / "out.onnx"),
             "OUT.safetensors": str(tmp_path / "out.safetensors")}
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(*[subst.get(a, a) for a in args], cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "evil.py" in res.stderr and "--trust-code" in res.stderr, res.stderr
    assert len(messages(res.stderr)) == 1, res.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_builtin_specs_need_no_trust(tmp_path: Path) -> None:
    model = surgery.spec.build_model("resnet20")
    plan = surgery.plan(model, torch.randn(*SHAPE), ratio=0.5)
    d = surgery.save(tmp_path / "r20", surgery.apply(model, plan), plan, spec="resnet20",
                     input_shape=SHAPE)
    assert surgery.load(d).conv1.out_channels == 8


def test_relative_paths_from_elsewhere_and_load_from_a_third_directory(tmp_path: Path) -> None:
    """The user's own model file, given relative to their folder; the saved directory loads
    (with trust) from anywhere, as an instance of their own class."""
    work, other, third = tmp_path / "work", tmp_path / "other", tmp_path / "third"
    for p in (work / "nets", other, third):
        p.mkdir(parents=True)
    (work / "nets" / "mynet_trust.py").write_text(MYNET)
    res = run("prune", "nets/mynet_trust.py:build", "--model-arg", "width=16", "--ratio", "0.5",
              "--input-shape", "1,3,16,16", "--out", "../other/small", "--no-onnx", cwd=work)
    assert res.returncode == 0, res.stderr
    meta = json.loads((other / "small" / "artifact.json").read_text())
    assert meta["spec"] == f"{(work / 'nets' / 'mynet_trust.py').resolve()}:build"
    # CLI from a third directory, relative path to the saved one
    res = run("export", "../other/small", "--trust-code", "--onnx", "m.onnx", cwd=third)
    assert res.returncode == 0, res.stderr
    assert (third / "m.onnx").is_file()
    res = run("export", "../other/small", "--onnx", "m2.onnx", cwd=third)
    assert res.returncode == 1 and "mynet_trust.py" in res.stderr
    # Python, from a third directory: the class is the user's importable module's class
    code = textwrap.dedent(f"""
        import sys, surgery
        sys.path.insert(0, {str(work / 'nets')!r})
        import mynet_trust
        small = surgery.load("../other/small", trust_code=True)
        assert isinstance(small, mynet_trust.MyNet), type(small).__module__
        assert small.conv1.out_channels == 8
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=third, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    # the file moved: said clearly
    (work / "nets" / "mynet_trust.py").rename(work / "moved.py")
    res = run("export", "../other/small", "--trust-code", "--onnx", "m3.onnx", cwd=third)
    assert res.returncode == 1 and "no longer exists" in res.stderr, res.stderr


def test_a_failing_user_factory_is_the_users_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def build():\n    raise ValueError('bad width')\n")
    res = run("inspect", "broken.py:build", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert "broken.py:build failed: ValueError: bad width" in res.stderr
    assert "please report" not in res.stderr
