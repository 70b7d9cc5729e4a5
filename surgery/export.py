"""ONNX export with a parity check, written atomically.

The file is produced by the exporter that ships with torch (``torch.onnx.export``, dynamo), checked
with ``onnx.checker``, run in ONNX Runtime and compared with PyTorch; only then is it renamed to
``path``. An interrupted or failed export never leaves a half-written file at ``path``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import default_mode, unwritable
from .errors import SurgeryError
from .graph import Inputs, as_tuple
from .runtimes import ort_session
from .stats import count_params
from .tensors import output_tensors, rel_error


class ExportError(SurgeryError, RuntimeError):
    """The model could not be exported to ONNX, or the file does not match PyTorch."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely ONNX Runtime matches PyTorch."""

    path: str
    file_bytes: int
    onnx_weights: int  # elements in the graph's initializers
    torch_params: int
    max_rel_error: float
    opset: int


def _check_target(path: Path) -> None:
    why = unwritable(path.parent)
    if why:
        raise ExportError(f"cannot write {path}: {why}")


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike[str], *,
                dynamic_batch: bool = True, rtol: float = 1e-4, opset: int | None = None
                ) -> ExportReport:
    """Export ``model`` (in eval mode, on a copy) to ONNX at ``path`` and check it.

    Raises:
        ExportError: the folder is missing or read-only, an op cannot be exported (named), the
            checker rejects the graph, or ONNX Runtime's outputs differ by more than ``rtol``
            (max |ort - torch| / max |torch|). Nothing is left at ``path`` then.

    Example:
        >>> surgery.export_onnx(small, torch.randn(1, 3, 224, 224), "small.onnx").max_rel_error
    """
    import onnx

    target = Path(path)
    _check_target(target)
    inputs = as_tuple(example_inputs)
    if dynamic_batch:  # torch.export specialises a dynamic dim whose example size is 1
        inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.ndim
                       and x.shape[0] == 1 else x for x in inputs)
    model = copy.deepcopy(model).eval()
    names = [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    dyn = tuple({0: torch.export.Dim("batch", min=1, max=4096)} for _ in inputs) \
        if dynamic_batch else None
    # Protobuf caps a file at 2 GB: bigger models keep their weights in NAME.data beside it.
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > 1.5e9
    tmpdir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    tmp = tmpdir / target.name
    try:
        try:
            with warnings.catch_warnings(), _quiet_exporter():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, inputs, str(tmp), dynamo=True, external_data=big,
                                  dynamic_shapes=dyn, input_names=names, opset_version=opset,
                                  verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: "
                              f"{_first_line(e)}. The op named there has no ONNX translation; "
                              "rewrite it with standard ops or register a custom translation."
                              ) from e
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as e:
            raise ExportError(f"onnx.checker rejects the exported graph: {_first_line(e)}") from e
        proto = onnx.load(str(tmp), load_external_data=False)
        session = ort_session(tmp)
        with torch.no_grad():
            want = [t.numpy() for t in output_tensors(model(*inputs))]
        feed = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
        got = session.run(None, feed)
        del session
        err = max((rel_error(a, b) for a, b in zip(got, want, strict=False)), default=0.0)
        if len(got) != len(want) or not err <= rtol:
            raise ExportError(f"ONNX Runtime output differs from PyTorch: max relative error "
                              f"{err:.3g} > {rtol:g} ({len(got)} vs {len(want)} outputs)")
        weights = sum(int(np.prod(i.dims)) for i in proto.graph.initializer)
        used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
                          0)
        size = 0
        # external data first, the .onnx file last: a reader never finds it without its data
        for f in sorted(tmpdir.iterdir(), key=lambda f: f == tmp):
            default_mode(f)
            size += f.stat().st_size
            os.replace(f, target.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportReport(str(target), size, weights, count_params(model), err,
                        used_opset)


def _first_line(e: BaseException) -> str:
    """The innermost cause's first line: where the exporter names the op it could not convert."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress chatter (printed to stdout and the torch.onnx logger)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logger.setLevel(level)
