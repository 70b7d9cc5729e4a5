"""Model specs: how the CLI and saved artifacts name a model without pickling it.

    torchvision:resnet50        a torchvision model, built with weights=None
    path/to/file.py:factory     a function in a Python file that returns an nn.Module
    resnet20                    one of our reference networks in models/
    out/r50                     a directory saved by `surgery prune` (see surgery.artifact)

Factory keyword arguments come as ``k=v`` strings (``--model-arg num_classes=10``); values are
parsed as Python literals when they are one, else kept as strings.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import SurgeryError


class SpecError(SurgeryError, ValueError):
    """A model spec that names nothing we can build."""


MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


def parse_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"model argument {pair!r} is not of the form name=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def reference_models() -> dict[str, Path]:
    """Our reference networks: every public factory named in a models/*.py file's __all__."""
    found: dict[str, Path] = {}
    for file in sorted(MODELS_DIR.glob("*.py")):
        try:
            tree = ast.parse(file.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                for name in ast.literal_eval(node.value):
                    found[name] = file
    return found


def _load_file(path: Path) -> Any:
    mod_name = "surgery_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise SpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _call(factory: Any, kwargs: Mapping[str, Any], what: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as e:
        sig = inspect.signature(factory) if callable(factory) else "?"
        raise SpecError(f"{what}{sig} does not accept {dict(kwargs)}: {e}") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"{what} returned {type(model).__name__}, expected an nn.Module")
    return model


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model a spec names (a saved directory is loaded with surgery.load instead)."""
    kwargs = dict(kwargs or {})
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise SpecError(f"torchvision has no model {name!r}; see "
                            "torchvision.models.list_models()")
        kwargs.setdefault("weights", None)
        if kwargs["weights"] is not None:
            raise SpecError("weights must stay None: nothing is downloaded at run time")
        return _call(lambda **kw: torchvision.models.get_model(name, **kw), kwargs, spec)
    head, sep, factory = spec.rpartition(":")
    if sep and head.endswith(".py"):
        path = Path(head)
        if not path.is_file():
            raise SpecError(f"model file {path} does not exist")
        module = _load_file(path)
        if not hasattr(module, factory):
            raise SpecError(f"{path} defines no {factory!r}")
        return _call(getattr(module, factory), kwargs, spec)
    refs = reference_models()
    if spec in refs:
        return _call(getattr(_load_file(refs[spec]), spec), kwargs, spec)
    raise SpecError(f"unknown model spec {spec!r}: use torchvision:NAME, path/to/file.py:factory, "
                    f"a directory saved by `surgery prune`, or one of {sorted(refs)}")
