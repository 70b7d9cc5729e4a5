"""surgery: make PyTorch conv nets physically smaller by structured pruning, and prove it.

    graph = surgery.trace(model, x)             # coupled channel groups
    plan  = surgery.plan(model, x, ratio=0.5)   # which channels every layer keeps (JSON-able)
    small = surgery.apply(model, plan)          # a new smaller model; `model` untouched
    small = surgery.prune(model, x, ratio=0.5)  # plan + apply + verify
"""

from importlib.metadata import PackageNotFoundError, version

from .api import plan_for_macs, prune
from .artifact import ArtifactError, load, save
from .bench import BenchReport, Measurement, bench
from .criteria import criteria, register_criterion
from .errors import (
    ConfigError,
    ExampleInputError,
    PlanError,
    SurgeryError,
    TraceError,
    UnsupportedLayerError,
    VerificationError,
)
from .export import ExportError, ExportReport, RuntimeMissingError, export_onnx
from .masks import MaskReport, from_masks
from .graph import ChannelGraph, fingerprint, trace
from .plan import Plan
from .plan import make_plan as plan
from .rules import ModuleRule, register_function_rule, register_module_rule
from .stats import count_macs, count_params
from .surgeon import apply, apply_
from .verify import VerifyReport, verify

try:
    __version__ = version("surgery")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "ArtifactError", "BenchReport", "plan_for_macs", "MaskReport", "from_masks", "ChannelGraph", "ConfigError", "ExportError", "ExportReport", "Measurement",
    "RuntimeMissingError", "bench", "export_onnx", "ExampleInputError", "ModuleRule", "Plan", "PlanError",
    "SurgeryError", "TraceError", "UnsupportedLayerError", "VerificationError", "VerifyReport",
    "__version__", "apply", "load", "save", "apply_", "count_macs", "count_params", "criteria", "fingerprint",
    "plan", "prune", "register_criterion", "register_function_rule", "register_module_rule",
    "trace", "verify",
]
