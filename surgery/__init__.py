"""surgery: make PyTorch conv nets physically smaller by structured pruning, and prove it.

    graph = surgery.trace(model, x)             # coupled channel groups
    plan  = surgery.plan(model, x, ratio=0.5)   # which channels every layer keeps (JSON-able)
    small = surgery.apply(model, plan)          # a new smaller model; `model` untouched
    small = surgery.prune(model, x, ratio=0.5)  # plan + apply + verify
    small = surgery.prune(model, x, surgery.MacBudget(0.25))  # a typed config: keep 25% MACs
    plan  = surgery.latency_plan(model, x, ratio=0.5, runtime="ort")  # same MACs, laid out
                                                # where ONNX Runtime saves the most time

The public names load on first use (importing torch takes seconds; `surgery --help` should not).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("surgery")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

#: module -> the public names it defines (``surgery.NAME`` loads ``surgery.MODULE.NAME``)
_EXPORTS = {
    "api": "plan plan_for_macs prune",
    "artifact": "ArtifactError load save",
    "bench": "bench BenchReport Measurement",
    "config": "config_from_dict LatencyTarget MacBudget PruneConfig RuntimeAware Uniform",
    "criteria": "criteria register_criterion",
    "depth": "Bypass find_bypasses sensitivity",
    "errors": ("ConfigError ExampleInputError NothingToPruneError PlanError RuntimeMissingError "
               "SurgeryError TraceError UnsupportedLayerError VerificationError"),
    "export": "export_onnx ExportError ExportReport",
    "finetune": "finetune FinetuneConfig",
    "graph": "ChannelGraph fingerprint trace",
    "groups": "TVal",
    "latency": "latency_model latency_plan LatencyModel register_cost",
    "masks": "from_masks MaskReport",
    "plan": "Plan",
    "rules": "ModuleRule register_function_rule register_module_rule RuleContext",
    "runtimes": "get_runtime LayerProgram register_runtime Runtime runtime_names",
    "stats": "count_macs count_params",
    "surgeon": "apply apply_",
    "verify": "verify VerifyReport",
}
#: public name -> (module, attribute); attribute None: the module itself
_PUBLIC: dict[str, tuple[str, str | None]] = {
    name: (mod, name) for mod, names in _EXPORTS.items() for name in names.split()}
_PUBLIC["sparse"] = ("sparse", None)
__all__ = ["__version__", *_PUBLIC]

#: public functions that share their name with a submodule: the function wins, as it would with
#: eager imports (the import system would otherwise bind the submodule once it is imported)
_SHADOWED = {name for name, (_, attr) in _PUBLIC.items() if attr is not None} & {
    m.name for m in pkgutil.iter_modules(__path__)}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        mod, attr = _PUBLIC[name]
        module = importlib.import_module(f".{mod}", __name__)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    try:  # a submodule not imported yet: surgery.spec, surgery.rules ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # for type checkers and IDEs: the eager view of the same names
    from . import sparse
    from .api import plan, plan_for_macs, prune
    from .artifact import ArtifactError, load, save
    from .bench import BenchReport, Measurement, bench
    from .config import (
        LatencyTarget,
        MacBudget,
        PruneConfig,
        RuntimeAware,
        Uniform,
        config_from_dict,
    )
    from .criteria import criteria, register_criterion
    from .depth import Bypass, find_bypasses, sensitivity
    from .errors import (
        ConfigError,
        ExampleInputError,
        NothingToPruneError,
        PlanError,
        RuntimeMissingError,
        SurgeryError,
        TraceError,
        UnsupportedLayerError,
        VerificationError,
    )
    from .export import ExportError, ExportReport, export_onnx
    from .finetune import FinetuneConfig, finetune
    from .graph import ChannelGraph, fingerprint, trace
    from .groups import TVal
    from .latency import LatencyModel, latency_model, latency_plan, register_cost
    from .masks import MaskReport, from_masks
    from .plan import Plan
    from .rules import ModuleRule, RuleContext, register_function_rule, register_module_rule
    from .runtimes import LayerProgram, Runtime, get_runtime, register_runtime, runtime_names
    from .stats import count_macs, count_params
    from .surgeon import apply, apply_
    from .verify import VerifyReport, verify
