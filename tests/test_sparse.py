"""Unstructured magnitude pruning, fine-tuning with masks, and the sparse weights file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_norms
from patterns import cbr
from test_cli import run
from torch import nn

import surgery
from surgery import sparse
from surgery.spec import build_model


class Small(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.a = cbr(3, width)
        self.b = cbr(width, 2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def test_global_scope_ranks_all_layers_together() -> None:
    model = Small()
    with torch.no_grad():
        model.b[0].weight.mul_(10)  # b's weights are the largest: global keeps more of them
    sparse.magnitude_prune_(model, 0.8)
    s = sparse.sparsity(model)
    assert abs(s.overall - 0.8) < 0.01
    assert s.per_layer["b.0"] < 0.8 < s.per_layer["a.0"]


def test_layer_scope_prunes_each_layer_by_amount() -> None:
    model = Small()
    sparse.magnitude_prune_(model, 0.5, scope="layer")
    for name, frac in sparse.sparsity(model).per_layer.items():
        assert abs(frac - 0.5) < 0.02, name


def test_zeros_survive_training_and_make_permanent() -> None:
    model = Small()
    sparse.magnitude_prune_(model, 0.7)
    zero = model.a[0].weight == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model.a[0].weight[zero] == 0).all()
    model.eval()
    masked_out = model(x)
    sparse.make_permanent_(model)
    assert not hasattr(model.a[0], "weight_orig") and not model.a[0]._forward_pre_hooks
    assert isinstance(model.a[0].weight, nn.Parameter)
    torch.testing.assert_close(model(x), masked_out)
    assert abs(sparse.sparsity(model).overall - 0.7) < 0.01


@pytest.mark.parametrize("permanent", [True, False])
def test_sparse_file_round_trip_is_smaller(tmp_path: Path, permanent: bool) -> None:
    model = randomize_norms(Small()).eval()
    sparse.magnitude_prune_(model, 0.9)
    if permanent:
        sparse.make_permanent_(model)
    path = tmp_path / "m.safetensors"
    size = sparse.save_sparse(model, path)
    dense = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                if not k.endswith("_mask"))
    assert size == path.stat().st_size and size < 0.35 * dense
    fresh = Small()
    sparse.load_sparse(fresh, path)
    fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_sparse_file_errors(tmp_path: Path) -> None:
    model = Small()
    sparse.magnitude_prune_(model, 0.8)
    path = tmp_path / "m.safetensors"
    sparse.save_sparse(model, path)
    with pytest.raises(sparse.SparseFileError, match="does not fit Small .*different shape"):
        sparse.load_sparse(Small(width=16), path)
    # a masked model of the same architecture, given a file that lacks a layer: untouched
    target = sparse.magnitude_prune_(Small(), 0.5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    partial = tmp_path / "partial.safetensors"
    del model.fc
    model.fc = nn.Identity()
    sparse.save_sparse(model, partial)
    with pytest.raises(sparse.SparseFileError, match="missing: fc.bias, fc.weight"):
        sparse.load_sparse(target, partial)
    assert hasattr(target.a[0], "weight_mask")  # still masked, weights as they were
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(sparse.SparseFileError, match="damaged.safetensors"):
        sparse.load_sparse(Small(), damaged)
    with pytest.raises(sparse.SparseFileError, match="does not exist"):
        sparse.load_sparse(Small(), tmp_path / "missing.safetensors")
    with pytest.raises(sparse.SparseFileError, match="folder .* does not exist"):
        sparse.save_sparse(model, tmp_path / "nowhere" / "m.safetensors")
    with pytest.raises(surgery.ConfigError, match="amount must be a fraction"):
        sparse.magnitude_prune_(Small(), 1.5)


def test_cli_sparsify_fine_tunes_and_reports_sizes(tmp_path: Path) -> None:
    out = tmp_path / "r20.sparse.safetensors"
    res = run("sparsify", "resnet20", "--amount", "0.8", "--data", "digits", "--epochs", "1",
              "--input-shape", "1,3,8,8", "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout[res.stdout.index("{"):])
    assert abs(rep["sparsity"] - 0.8) < 0.01
    assert rep["sparse_bytes"] == out.stat().st_size and rep["size_ratio"] > 2
    runtimes = {r["runtime"] for r in rep["latency"]}
    assert runtimes == {"torch", "ort"}
    net = sparse.load_sparse(build_model("resnet20"), out)
    assert abs(sparse.sparsity(net).overall - 0.8) < 0.01
    res = run("sparsify", "resnet20", "--amount", "0.8", "--epochs", "2", "--out", str(out))
    assert res.returncode == 1 and "--epochs needs --data" in res.stderr
    res = run("sparsify", "resnet20", "--amount", "0.5", "--out", str(tmp_path / "no" / "x"))
    assert res.returncode == 1 and "does not exist" in res.stderr


class Tied(nn.Module):
    """Tied weights, and a buffer whose name ends like a pruning mask."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(64, 64, bias=False)
        self.dec = nn.Linear(64, 64, bias=False)
        self.dec.weight = self.enc.weight
        self.register_buffer("attn_mask", torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x) + self.attn_mask)


def test_tied_weights_and_mask_like_names_round_trip(tmp_path: Path) -> None:
    model = Tied()
    sparse.make_permanent_(sparse.magnitude_prune_(model, 0.6, scope="layer",
                                                   types=(nn.Linear,)))
    path = tmp_path / "t.safetensors"
    sparse.save_sparse(model, path)
    fresh = sparse.load_sparse(Tied(), path)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert torch.equal(fresh.attn_mask, model.attn_mask)


def test_saved_weights_are_current_after_a_step_without_forward(tmp_path: Path) -> None:
    model = Small()
    sparse.magnitude_prune_(model, 0.5)
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # an optimiser step: the hook's cached `weight` is now stale
    path = tmp_path / "m.safetensors"
    sparse.save_sparse(model, path)
    fresh = sparse.load_sparse(Small(), path)
    expected = model.a[0].weight_orig.detach() * model.a[0].weight_mask
    assert torch.equal(fresh.a[0].weight.detach(), expected)
