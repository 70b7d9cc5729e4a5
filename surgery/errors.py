"""Typed errors. Each one names the layer, op or file at fault and says what to do."""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class of every error raised by surgery."""


class ConfigError(SurgeryError, ValueError):
    """An argument is out of range or malformed (e.g. ratio outside [0, 1))."""


class ExampleInputError(SurgeryError, ValueError):
    """The model does not run on the example inputs it was given."""


class TraceError(SurgeryError, RuntimeError):
    """torch.fx could not trace the forward (e.g. data-dependent control flow)."""


class UnsupportedLayerError(SurgeryError, TypeError):
    """A layer with channels (parameters) that no rule knows how to prune."""


class PlanError(SurgeryError, ValueError):
    """A plan is malformed or was made for another architecture."""


class VerificationError(SurgeryError, RuntimeError):
    """The pruned model does not behave like the original with the removed channels zeroed."""


class NothingToPruneError(SurgeryError, ValueError):
    """No coupled group of the model has channels that may be removed."""


class RuntimeMissingError(SurgeryError, RuntimeError):
    """A requested runtime (onnxruntime, CUDA) is not available on this machine."""
