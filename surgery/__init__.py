"""surgery: make PyTorch conv nets physically smaller by structured pruning, and prove it.

    graph = surgery.trace(model, x)             # coupled channel groups
    plan  = surgery.plan(model, x, ratio=0.5)   # which channels every layer keeps (JSON-able)
    small = surgery.apply(model, plan)          # a new smaller model; `model` untouched
    small = surgery.prune(model, x, ratio=0.5)  # plan + apply + verify
    plan  = surgery.latency_plan(model, x, ratio=0.5, runtime="ort")  # same MACs, laid out
                                                # where ONNX Runtime saves the most time
"""

from importlib.metadata import PackageNotFoundError, version

from . import sparse
from .api import plan_for_macs, prune
from .artifact import ArtifactError, load, save
from .bench import BenchReport, Measurement, bench
from .criteria import criteria, register_criterion
from .errors import (
    ConfigError,
    ExampleInputError,
    NothingToPruneError,
    PlanError,
    SurgeryError,
    TraceError,
    UnsupportedLayerError,
    VerificationError,
)
from .export import ExportError, ExportReport, RuntimeMissingError, export_onnx
from .graph import ChannelGraph, fingerprint, trace
from .groups import TVal
from .latency import LatencyModel, latency_model, latency_plan, register_cost
from .masks import MaskReport, from_masks
from .plan import Plan
from .plan import make_plan as plan
from .rules import ModuleRule, RuleContext, register_function_rule, register_module_rule
from .stats import count_macs, count_params
from .surgeon import apply, apply_
from .verify import VerifyReport, verify

try:
    __version__ = version("surgery")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "apply",
    "apply_",
    "ArtifactError",
    "bench",
    "BenchReport",
    "ChannelGraph",
    "ConfigError",
    "count_macs",
    "count_params",
    "criteria",
    "ExampleInputError",
    "export_onnx",
    "ExportError",
    "ExportReport",
    "fingerprint",
    "LatencyModel",
    "latency_model",
    "latency_plan",
    "from_masks",
    "load",
    "MaskReport",
    "NothingToPruneError",
    "Measurement",
    "ModuleRule",
    "Plan",
    "plan",
    "plan_for_macs",
    "PlanError",
    "prune",
    "register_cost",
    "register_criterion",
    "register_function_rule",
    "register_module_rule",
    "RuleContext",
    "RuntimeMissingError",
    "save",
    "sparse",
    "SurgeryError",
    "trace",
    "TraceError",
    "TVal",
    "UnsupportedLayerError",
    "VerificationError",
    "verify",
    "VerifyReport",
]
