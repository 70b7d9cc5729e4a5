"""Saved pruned models: a directory of plain data, no pickle anywhere.

    DIR/artifact.json        spec of the original model, tool version, fingerprints, file hashes
    DIR/plan.json            the plan (surgery.Plan)
    DIR/weights.safetensors  the pruned model's parameters and buffers
    DIR/...                  anything else the caller adds (model.onnx, report.md, report.json)

``save`` swaps the new directory in atomically (``surgery.atomic``): a kill at any moment
leaves the old DIR or the complete new one, and the next save cleans what a killed one left.
``load(DIR)`` rebuilds the original architecture from its spec, applies the plan and loads the
weights, checking fingerprints and hashes at each step; it never returns a half-loaded model.
Nothing in DIR is executed, and a spec that names a Python file (``/path/net.py:build``) is refused
unless the caller passes ``trust_code=True`` (CLI: ``--trust-code``): a directory from elsewhere
must not be able to run code by naming it. Built-in specs (torchvision, timm, our reference
networks) need no trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import default_mode, recover, replacing
from .errors import PlanError, SurgeryError
from .graph import fingerprint
from .plan import Plan
from .spec import build_model, canonical, code_file
from .surgeon import apply

FORMAT = "surgery-artifact"
VERSION = 1
WEIGHTS = "weights.safetensors"
PLAN = "plan.json"
META = "artifact.json"


class ArtifactError(SurgeryError, ValueError):
    """A saved directory is missing, corrupted, or does not match its architecture."""


class UntrustedCodeError(ArtifactError):
    """A saved directory names a Python file to build its model and the caller did not trust it."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / META).is_file()


def save(directory: str | os.PathLike[str], pruned: nn.Module, plan: Plan, *, spec: str,
         model_args: Mapping[str, Any] | None = None, input_shape: Sequence[int] = (),
         extra: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write a pruned model as an artifact directory, atomically.

    ``extra`` maps file names to writers ``fn(path)`` (ONNX export, reports) run inside the
    temporary directory before it is renamed into place.
    """
    from safetensors.torch import save_model

    from . import __version__

    target = Path(directory)
    recover(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir())
                                                    and not is_artifact(target))):
        raise ArtifactError(f"{target} exists and is not a surgery artifact directory; choose "
                            "another --out (surgery only replaces its own directories)")
    parent = target.parent.resolve()
    if not parent.is_dir():
        parent.mkdir(parents=True)
    with replacing(parent / target.name) as tmp:
        default_mode(tmp, directory=True)
        plan.save(tmp / PLAN)
        save_model(pruned, str(tmp / WEIGHTS))
        for name, writer in (extra or {}).items():
            writer(tmp / name)
        meta = {
            "format": FORMAT, "version": VERSION, "surgery_version": __version__,
            "spec": canonical(spec), "model_args": dict(model_args or {}),
            "input_shape": list(input_shape), "original_fingerprint": plan.fingerprint,
            "pruned_fingerprint": fingerprint(pruned),
            "files": {PLAN: _sha256(tmp / PLAN), WEIGHTS: _sha256(tmp / WEIGHTS)},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            default_mode(f)
    return target


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    d = Path(directory)
    if not d.exists():
        with contextlib.suppress(OSError):
            recover(d)  # a save killed mid-swap left the old directory aside: put it back
    if not d.is_dir():
        raise ArtifactError(f"{d} is not a directory saved by `surgery prune`")
    try:
        meta = json.loads((d / META).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{d} is not a surgery artifact: {META} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{d / META} is corrupted ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{d / META} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ArtifactError(f"{d} was saved in artifact format v{meta.get('version')}; this "
                            f"surgery reads v{VERSION}")
    return meta


def build_original(directory: str | os.PathLike[str], meta: Mapping[str, Any] | None = None, *,
                   trust_code: bool = False) -> nn.Module:
    """The unpruned model a saved directory was made from, built from its recorded spec.

    A spec naming a Python file is imported only with ``trust_code=True``; otherwise
    `UntrustedCodeError` names the file, and nothing is imported.
    """
    d = Path(directory)
    meta = read_meta(d) if meta is None else meta
    spec = meta["spec"]
    if not isinstance(spec, str):
        raise ArtifactError(f"{d / META}: 'spec' is not a string")
    path = code_file(spec)
    if path is not None and not trust_code:
        raise UntrustedCodeError(
            f"{d} builds its model by running {path} ({META} spec {spec!r}); refusing to run "
            "code named by a saved directory. If you trust it, pass trust_code=True (CLI: "
            "--trust-code)")
    if path is not None and not path.is_file():
        raise ArtifactError(f"{d} was saved from the model file {path}, which no longer exists; "
                            f"put it back there or edit 'spec' in {d / META}")
    return build_model(spec, meta.get("model_args"))


def load(directory: str | os.PathLike[str], *, trust_code: bool = False) -> nn.Module:
    """Rebuild a pruned model from an artifact directory (no pickle; no code unless trusted).

    ``trust_code=True`` allows importing the Python file that the directory's spec names (a
    model of your own, ``net.py:build``); built-in specs never need it.

    Example:
        >>> small = surgery.load("out/r50")
        >>> mine = surgery.load("out/mynet", trust_code=True)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    d = Path(directory)
    meta = read_meta(d)
    for name in (PLAN, WEIGHTS):
        if not (d / name).is_file():
            raise ArtifactError(f"{d / name} is missing; the artifact is incomplete")
        if _sha256(d / name) != meta["files"].get(name):
            raise ArtifactError(f"{d / name} does not match the hash recorded in {META}: the "
                                "file was modified or truncated; re-run `surgery prune`")
    original = build_original(d, meta, trust_code=trust_code)
    if fingerprint(original) != meta["original_fingerprint"]:
        raise ArtifactError(f"{d} was made from a different architecture than what "
                            f"{meta['spec']!r} builds now (fingerprint "
                            f"{meta['original_fingerprint']} vs {fingerprint(original)})")
    shape = meta.get("input_shape")
    try:  # with the input shape it was pruned at, the plan is checked against the model's groups
        pruned = apply(original, Plan.load(d / PLAN), _example(shape) if shape else None)
    except PlanError as e:
        raise ArtifactError(f"{d / PLAN}: {e}") from e
    try:
        missing, unexpected = load_model(pruned, str(d / WEIGHTS), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ArtifactError(f"{d / WEIGHTS} cannot be loaded into the pruned architecture: "
                            f"{str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise ArtifactError(f"{d / WEIGHTS} does not fit the pruned architecture (missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if fingerprint(pruned) != meta["pruned_fingerprint"]:
        raise ArtifactError(f"{d} rebuilt to a different pruned architecture than was saved")
    return pruned


def _example(shape: Sequence[int]) -> Any:
    import torch

    return torch.randn(tuple(int(n) for n in shape), generator=torch.Generator().manual_seed(0))


def load_any(spec: str | os.PathLike[str], model_args: Mapping[str, Any] | None = None, *,
             trust_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a spec (``torchvision:resnet18``, ``file.py:build`` …) or a saved directory,
    and what is recorded about it (``spec``, ``model_args``, ``input_shape`` when saved)."""
    if os.path.isdir(spec):
        meta = read_meta(spec)
        return load(spec, trust_code=trust_code), meta
    spec = str(spec)
    if spec.endswith(".onnx"):
        raise ArtifactError(f"{spec} is an ONNX file; only `surgery bench` takes ONNX files")
    kwargs = dict(model_args or {})
    return build_model(spec, kwargs), {"spec": spec, "model_args": kwargs}


def save_pruned(directory: str | os.PathLike[str], original: nn.Module, pruned: nn.Module,
                plan: Plan, example_input: Any, check: Any, *, source: str,
                meta: Mapping[str, Any], onnx: bool = True,
                exporting: Callable[[], Any] = contextlib.nullcontext) -> tuple[Path, dict]:
    """Save a pruned model with its prune report (``report.json``, ``report.md``) and, with
    ``onnx``, a parity-checked ``model.onnx``; returns the directory and the report.

    ``source`` is what was pruned (a spec, or a saved directory: then the saved plan is chained
    with this one, so the new directory's plan still starts from the original model); ``meta``:
    its ``spec``, ``model_args`` and ``input_shape``. ``exporting``: a context the ONNX export
    runs in (a progress display).
    """
    from .report import prune_report, to_markdown

    report = prune_report(original, pruned, plan, example_input, check, spec=str(source))

    def write_onnx(path: Path) -> None:
        from .export import export_onnx

        with exporting():
            report["onnx"] = {**export_onnx(pruned, example_input, path).__dict__,
                              "path": "model.onnx"}

    def write_reports(path: Path) -> None:
        (path.parent / "report.json").write_text(json.dumps(report, indent=1))
        path.write_text(to_markdown(report))

    extra: dict[str, Callable[[Path], None]] = {"model.onnx": write_onnx} if onnx else {}
    extra["report.md"] = write_reports
    if os.path.isdir(source):  # pruning a saved model again: one plan for the original spec
        plan = Plan.load(Path(source) / PLAN).then(plan)
    target = save(directory, pruned, plan, spec=meta["spec"], model_args=meta.get("model_args"),
                  input_shape=tuple(example_input.shape), extra=extra)
    return target, report


def save_trained(directory: str | os.PathLike[str], model: nn.Module, meta: Mapping[str, Any],
                 data: str, size: int) -> Path:
    """Save a model trained from scratch as an artifact with an empty plan (so it can be
    pruned, fine-tuned and loaded like any other)."""
    model.cpu()
    empty = Plan(type(model).__name__, fingerprint(model), {}, True, {"trained_on": data})
    return save(directory, model, empty, spec=meta["spec"], model_args=meta.get("model_args"),
                input_shape=(1, 3, size, size))
