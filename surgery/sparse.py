"""Unstructured magnitude pruning (through ``torch.nn.utils.prune``) and a sparse file format.

Unstructured zeros do not change a tensor's shape: dense kernels run at the same speed, so the
only sure gain is on disk. The file stores each mostly-zero tensor as a bit mask of its nonzeros
(1 bit per entry) plus the nonzero values, in a safetensors file: a tensor with ``n`` entries and
sparsity ``s`` takes ``n / 8 + (1 - s) * n * itemsize`` bytes instead of ``n * itemsize``.
Tensors below ``min_sparsity`` are stored dense. No pickle: loading executes nothing.

Workflow::

    surgery.sparse.magnitude_prune_(model, 0.8)          # masks via torch.nn.utils.prune
    surgery.finetune(model, train, val)                  # masks stay applied while training
    surgery.sparse.make_permanent_(model)                # weight = weight_orig * mask, hooks gone
    surgery.sparse.save_sparse(model, "model.sparse.safetensors")
    surgery.sparse.load_sparse(fresh_model, "model.sparse.safetensors")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from .atomic import atomic_file
from .errors import ConfigError, SurgeryError

FORMAT = "surgery.sparse/1"


def prunable_types() -> tuple[type[nn.Module], ...]:
    """The layer classes whose rule lays out a weight by input and output channel (convs,
    linear layers, and whatever a registered rule adds): the weights worth zeroing."""
    from .rules import ModuleRule, module_rules

    return tuple(cls for cls, rule in module_rules().items()
                 if {"in", "out"} <= set(rule.axes)
                 and type(rule).weight_rows is not ModuleRule.weight_rows)


class SparseFileError(SurgeryError, ValueError):
    """A sparse weights file that is missing, damaged or made for another model."""


@dataclass(frozen=True)
class Sparsity:
    """Fraction of zero weights, per layer (qualified name) and over all pruned layers."""

    per_layer: dict[str, float]
    overall: float
    zeros: int
    total: int


def _weights(model: nn.Module, types: Sequence[type[nn.Module]] | None
             ) -> list[tuple[str, Any]]:
    """(name, layer) of the layers of ``types`` (default: :func:`prunable_types`) that have a
    weight tensor."""
    types = prunable_types() if types is None else types
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, tuple(types)) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def magnitude_prune_(model: nn.Module, amount: float, *, scope: str = "global",
                     types: Sequence[type[nn.Module]] | None = None) -> nn.Module:
    """Zero the ``amount`` smallest-magnitude weights of every conv and linear layer, in place.

    ``scope="global"`` ranks all those weights together (layers end with different sparsity);
    ``scope="layer"`` removes ``amount`` of each layer. The masks are
    ``torch.nn.utils.prune`` reparametrisations, so fine-tuning keeps the zeros at zero; call
    :func:`make_permanent_` afterwards.

    Example:
        >>> surgery.sparse.magnitude_prune_(model, 0.8)
    """
    if not 0 <= amount < 1:
        raise ConfigError(f"amount must be a fraction in [0, 1) but received {amount!r}")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer' but received {scope!r}")
    types = prunable_types() if types is None else tuple(types)
    layers = _weights(model, types)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no layer of the types "
                          f"{[t.__name__ for t in types]} to prune")
    if scope == "global":
        tprune.global_unstructured([(m, "weight") for _, m in layers],
                                   pruning_method=tprune.L1Unstructured, amount=amount)
    else:
        for _, m in layers:
            tprune.l1_unstructured(m, "weight", amount=amount)
    return model


def make_permanent_(model: nn.Module) -> nn.Module:
    """Fold every ``torch.nn.utils.prune`` mask into its parameter and drop the hooks, in place."""
    for _, m, hook in _pruning_hooks(model):
        tprune.remove(m, hook._tensor_name)
    return model


def sparsity(model: nn.Module, types: Sequence[type[nn.Module]] | None = None) -> Sparsity:
    """How many weights of the conv and linear layers are exactly zero."""
    per, zeros, total = {}, 0, 0
    for name, m in _weights(model, types):
        w = m.weight.detach()
        z = int((w == 0).sum())
        per[name] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return Sparsity(per, zeros / max(total, 1), zeros, total)


def _pruning_hooks(model: nn.Module) -> list[tuple[str, nn.Module, tprune.BasePruningMethod]]:
    """(module name, module, hook) for every ``torch.nn.utils.prune`` reparametrisation."""
    return [(name, m, hook) for name, m in model.named_modules()
            for hook in list(m._forward_pre_hooks.values())
            if isinstance(hook, tprune.BasePruningMethod)]


def _state(model: nn.Module, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as the user sees it: masked tensors (``orig * mask``, fresh) under their
    plain names; with ``copy`` each a CPU copy of its own (tied weights share memory, which
    safetensors refuses), without it the live tensors (enough to compare names and shapes)."""
    state = dict(model.state_dict())
    for name, m, hook in _pruning_hooks(model):
        key = f"{name}.{hook._tensor_name}" if name else hook._tensor_name
        state.pop(key + "_orig")
        state.pop(key + "_mask")
        state[key] = hook.apply_mask(m)
    if not copy:
        return state
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def dense_bytes(model: nn.Module) -> int:
    """Size of the model's weights as one dense safetensors file (what ``save_sparse`` beats)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file(_state(model), f"{tmp}/dense.safetensors")
        return os.path.getsize(f"{tmp}/dense.safetensors")


def save_sparse(model: nn.Module, path: str | os.PathLike[str], *,
                min_sparsity: float = 0.3) -> int:
    """Write the model's weights with mostly-zero tensors packed; returns the file size in bytes.

    The file appears atomically (written aside, then renamed).

    Example:
        >>> surgery.sparse.save_sparse(model, "model.sparse.safetensors")
    """
    from safetensors.torch import save_file

    target = Path(path)
    if not target.parent.is_dir():
        raise SparseFileError(f"cannot write {target}: folder {target.parent} does not exist")
    tensors: dict[str, torch.Tensor] = {}
    meta = {"format": FORMAT}
    for k, v in _state(model).items():
        flat = v.reshape(-1)
        if v.is_floating_point() and v.numel() >= 64 and float((flat == 0).float().mean()) \
                >= min_sparsity:
            nz = flat != 0
            bits = np.packbits(nz.numpy())
            tensors[f"{k}::mask"] = torch.from_numpy(bits)
            tensors[f"{k}::values"] = flat[nz].clone()
            meta[k] = "packed:" + ",".join(map(str, v.shape))
        else:
            tensors[k] = v
    with atomic_file(target) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return target.stat().st_size


def read_sparse(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The dense state dict stored in a file written by :func:`save_sparse`."""
    from safetensors import SafetensorError, safe_open

    src = Path(path)
    if not src.is_file():
        raise SparseFileError(f"sparse weights file {src} does not exist")
    try:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise SparseFileError(f"{src} is not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise SparseFileError(f"{src} was not written by surgery.sparse.save_sparse "
                              f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    out = {k: v for k, v in raw.items() if "::" not in k}
    for k, how in meta.items():
        if not how.startswith("packed:"):
            continue
        try:
            shape = tuple(int(s) for s in how[len("packed:"):].split(",") if s)
            n = int(np.prod(shape))
            bits = raw[f"{k}::mask"].numpy()
            if bits.size * 8 < n:
                raise ValueError(f"{bits.size * 8} mask bits for {n} entries")
            nz = torch.from_numpy(np.unpackbits(bits, count=n).astype(bool))
            values = raw[f"{k}::values"].reshape(-1)
            if int(nz.sum()) != values.numel():
                raise ValueError(f"{values.numel()} values for {int(nz.sum())} nonzero positions")
        except KeyError as e:
            raise SparseFileError(f"{src}: tensor {k!r} lacks its {e.args[0]!r} part; "
                                  "the file is damaged") from e
        except ValueError as e:
            raise SparseFileError(f"{src}: tensor {k!r} is damaged ({e})") from e
        dense = torch.zeros(n, dtype=values.dtype)
        dense[nz] = values
        out[k] = dense.reshape(shape)
    return out


def load_sparse(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Fill ``model`` (same architecture as saved) from a sparse file; all or nothing.

    Example:
        >>> surgery.sparse.load_sparse(torchvision.models.resnet18(), "r18.sparse.safetensors")
    """
    state = read_sparse(path)
    own = _state(model, copy=False)
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or extra or wrong:
        detail = "; ".join(f"{what}: {', '.join(ks[:4])}{' …' if len(ks) > 4 else ''}"
                           for what, ks in (("missing", missing), ("unexpected", extra),
                                            ("different shape", sorted(wrong))) if ks)
        raise SparseFileError(f"{path} does not fit {type(model).__name__} ({detail}); load it "
                              "into the architecture it was saved from")
    make_permanent_(model)
    model.load_state_dict(state)
    return model


def sparsify(model: nn.Module, amount: float, path: str | os.PathLike[str], *,
             scope: str = "global", train: Callable[[nn.Module], None] | None = None,
             bench_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The whole unstructured job: zero ``amount`` of the weights by magnitude (``model`` is
    changed), ``train(model)`` with the masks on if given, write the sparse file at ``path``,
    and (with ``bench_shape``, an input shape without batch) time the dense original against
    the zeroed model on PyTorch and ONNX Runtime. Returns the report (sizes, latencies)."""
    import copy

    from .bench import bench

    target = Path(path)
    if not target.parent.is_dir():
        raise SparseFileError(f"cannot write {target}: folder {target.parent} does not exist")
    dense = copy.deepcopy(model)
    magnitude_prune_(model, amount, scope=scope)
    if train is not None:
        train(model)
    make_permanent_(model)
    sparse_bytes = save_sparse(model, target)
    size = dense_bytes(dense)
    stats = sparsity(model)
    report: dict[str, Any] = {"file": str(path), "sparsity": stats.overall,
                              "zero_weights": stats.zeros, "prunable_weights": stats.total,
                              "dense_bytes": size, "sparse_bytes": sparse_bytes,
                              "size_ratio": size / sparse_bytes, "latency": None}
    if bench_shape is not None:
        rep = bench({"dense": dense, "unstructured": model}, bench_shape,
                    runtimes=["torch", "ort"], batches=[1], rounds=10)
        report["latency"] = [{"model": r.model, "runtime": r.runtime, "median_ms": r.median_ms,
                              "speedup": r.speedup} for r in rep.rows]
    return report


def sparsify_lines(report: dict[str, Any]) -> list[str]:
    """The :func:`sparsify` report in lines for a person."""
    lines = [f"{report['sparsity']:.1%} of {report['prunable_weights']:,} conv/linear weights "
             "are zero",
             f"wrote {report['file']}: {report['sparse_bytes'] / 1e6:.2f} MB (dense safetensors "
             f"{report['dense_bytes'] / 1e6:.2f} MB, {report['size_ratio']:.2f}x smaller on "
             "disk)"]
    for r in report["latency"] or []:
        sp = f", speedup {r['speedup']:.2f}x" if r["speedup"] is not None else ""
        lines.append(f"{r['runtime']:>5} {r['model']:>12}: {r['median_ms']:.2f} ms (median){sp}")
    if report["latency"]:
        lines.append("dense kernels skip no zeros: the same latency is the expected result; "
                     "`surgery prune` removes whole channels and does get faster")
    return lines
