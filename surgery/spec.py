"""Model specs: how the CLI and saved artifacts name a model without pickling it.

    torchvision:resnet50        a torchvision model, built with weights=None
    timm:resnet50d              a timm model, built with pretrained=False
    ultralytics:yolov8n.yaml    an ultralytics YOLO model built from its yaml (no weights; needs
                                the optional ``ultralytics`` package, AGPL-3.0)
    path/to/file.py:factory     a function in a Python file that returns an nn.Module
    resnet20                    one of our reference networks in models/
    out/r50                     a directory saved by `surgery prune` (see surgery.artifact)

Only a ``file.py:factory`` spec runs code that is not part of torchvision, timm or surgery:
`code_file` names that file so that loading a saved directory can refuse it unless trusted.

Factory keyword arguments come as ``k=v`` strings (``--model-arg num_classes=10``); values are
parsed as Python literals when they are one, else kept as strings.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SurgeryError

if TYPE_CHECKING:
    from torch import nn


class SpecError(SurgeryError, ValueError):
    """A model spec that names nothing we can build."""


BUILTIN_PREFIXES = ("torchvision:", "timm:", "ultralytics:")


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


def code_file(spec: str) -> Path | None:
    """The user's Python file that building ``spec`` would import and run, or None when the spec
    names a built-in model (torchvision, timm, our reference networks)."""
    if spec.startswith(BUILTIN_PREFIXES):
        return None
    head, sep, _ = spec.rpartition(":")
    if sep and head.endswith(".py"):
        return Path(head)
    return None


def canonical(spec: str, base: str | os.PathLike[str] | None = None) -> str:
    """The spec with a ``file.py`` path made absolute (against ``base``, default the current
    directory), so that it names the same file from any working directory."""
    if spec.startswith("ultralytics:"):  # a yaml of the user's: its absolute path
        name = spec.split(":", 1)[1]
        local = Path(base or os.getcwd()) / name
        return f"ultralytics:{local.resolve()}" if local.is_file() else spec
    path = code_file(spec)
    if path is None:
        return spec
    factory = spec.rpartition(":")[2]
    return f"{(Path(base or os.getcwd()) / path).resolve()}:{factory}"


def _same_file(module: Any, path: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve() == path.resolve()


def _free_or_same(name: str, path: Path) -> bool:
    """Whether ``import name`` finds nothing or finds this very file (never shadow another)."""
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return found is None or (found.origin is not None
                             and Path(found.origin).resolve() == path.resolve())


def _load_file(path: Path) -> Any:
    """Import a model file. Under its own name (``mymodel.py`` -> ``mymodel``) when that name is
    free or already is this file, so ``isinstance(model, mymodel.MyNet)`` holds for the caller;
    under a private name when another module already has that name."""
    own = path.stem
    if own in sys.modules and _same_file(sys.modules[own], path):
        return sys.modules[own]
    if own.isidentifier() and own not in sys.modules and _free_or_same(own, path):
        mod_name = own
    else:
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
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise SpecError(f"{what}{inspect.signature(factory)} does not accept {dict(kwargs)}: "
                        f"{e}") from e
    except ValueError:  # no signature to check (a builtin): let the call say
        pass
    from torch import nn

    try:
        model = factory(**kwargs)
    except Exception as e:  # the user's factory failed: their error, named as theirs
        raise SpecError(f"building {what} failed: {type(e).__name__}: {e}") from e
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
    if spec.startswith("timm:"):
        return _timm_model(spec, kwargs)
    if spec.startswith("ultralytics:"):
        return _ultralytics_model(spec, kwargs)
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
    raise SpecError(f"unknown model spec {spec!r}: use torchvision:NAME, timm:NAME, "
                    "path/to/file.py:factory, "
                    f"a directory saved by `surgery prune`, or one of {sorted(refs)}")


def _timm_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """A timm model with random weights (``checkpoint_path=`` loads a local file instead)."""
    try:
        import timm
    except ImportError:
        raise SpecError(f"{spec} needs timm: pip install timm") from None
    name = spec.split(":", 1)[1]
    if not timm.is_model(name):
        raise SpecError(f"timm has no model {name!r}; see timm.list_models()")
    kwargs.setdefault("pretrained", False)
    if kwargs["pretrained"]:
        raise SpecError("pretrained must stay False: nothing is downloaded at run time (give a "
                        "local file as checkpoint_path=...)")
    return _call(lambda **kw: timm.create_model(name, **kw), kwargs, spec)


def _ultralytics_model(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """The ``nn.Module`` of an ultralytics YOLO built from a yaml (bundled, like
    ``yolov8n-seg.yaml``, or a file), random weights. Keyword arguments (``nc=10``) go to the
    task model's constructor. Weight files (``.pt``) are refused: they are pickles (code)."""
    name = spec.split(":", 1)[1]
    if not name.endswith((".yaml", ".yml")):
        raise SpecError(f"{spec}: give a model yaml (ultralytics:yolov8n.yaml); weight files are "
                        "not loaded (nothing is downloaded, and a .pt file is a pickle that runs "
                        "code)")
    try:
        from ultralytics import YOLO
    except ImportError:
        raise SpecError(f"{spec} needs the optional ultralytics package (AGPL-3.0): "
                        "pip install ultralytics") from None
    try:
        model = YOLO(name, verbose=False).model
    except (FileNotFoundError, OSError) as e:
        raise SpecError(f"{spec}: ultralytics has no model yaml {name!r} ({e})") from None
    from torch import nn

    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec}: ultralytics built no model from {name!r}")
    if kwargs:
        cls: Any = type(model)
        return _call(lambda **kw: cls(name, **{"verbose": False, **kw}), kwargs, spec)
    return model
