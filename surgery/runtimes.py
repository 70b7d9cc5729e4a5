"""Where models run: one registry entry per runtime, read by ``bench``, latency-aware allocation
and the command line.

A :class:`Runtime` knows whether it is available here, how to run a whole model (a PyTorch module
or an exported ONNX file) and a single layer (a :class:`LayerProgram` from the layer's cost
model), and how to time one call with the synchronisation it needs. Built in: ``torch`` (PyTorch
eager on the CPU), ``cuda`` (PyTorch on the first CUDA device), ``ort`` (ONNX Runtime CPU),
``ort-cuda`` (ONNX Runtime's CUDA execution provider) and ``torch-fused`` (PyTorch eager with
BatchNorm folded into the convs: the deploy form, as ONNX Runtime folds it). Adding one is one
:func:`register_runtime` call.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, RuntimeMissingError

if TYPE_CHECKING:  # torch is imported where a runtime runs, so the CLI starts fast
    import numpy as np
    import torch
    from torch import nn

__all__ = ["LayerProgram", "Runtime", "RuntimeMissingError", "get_runtime", "register_runtime",
           "runtime_names"]


@dataclass
class LayerProgram:
    """One layer at given widths, in every form a runtime may run it.

    ``inputs``: the tensors it is called with (random, the right shapes); ``torch``: the eager
    call on them, or None where eager pays nothing for it; ``onnx_nodes``/``onnx_inits``: the same
    layer as ONNX nodes reading ``x`` (the first input) and writing ``y``, with their initializers
    (name -> array), or ``onnx_nodes=None`` where ONNX Runtime folds the layer away;
    ``folds``: a deploy-time fusion folds it into the layer before (BatchNorm into its conv).
    """

    inputs: list[torch.Tensor]
    torch: Callable[..., Any] | None
    onnx_nodes: list[Any] | None = None
    onnx_inits: dict[str, np.ndarray] = field(default_factory=dict)
    out_rank: int = 4
    folds: bool = False

    def onnx_model(self) -> bytes:
        """The layer as a serialised one-node ONNX model (opset 17)."""
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        x = self.inputs[0]
        graph = helper.make_graph(
            self.onnx_nodes or [],
            "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * self.out_rank)],
            [numpy_helper.from_array(a.astype(np.float32), name)
             for name, a in self.onnx_inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return bytes(model.SerializeToString())


class Runtime:
    """A place a model runs. Subclasses set ``name``, ``description``, ``form`` (``"module"``:
    runs the PyTorch module; ``"onnx"``: runs the exported ONNX file) and implement the methods.
    """

    name: str = ""
    description: str = ""
    form: str = "module"

    def missing(self) -> str | None:
        """Why this runtime cannot run here (with what to install), or None when it can."""
        return None

    def check(self) -> None:
        """Raise :class:`RuntimeMissingError` naming what is missing, if anything."""
        why = self.missing()
        if why:
            raise RuntimeMissingError(f"runtime {self.name!r} {why}")

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Callable[[], Any]:
        """A callable running the whole model once on ``x`` (the module, or the ONNX file)."""
        raise NotImplementedError

    def layer_runner(self, layer: LayerProgram, threads: int) -> Callable[[], Any] | None:
        """A callable running one layer once; None: the layer costs nothing on this runtime."""
        raise NotImplementedError

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """Milliseconds of one call of ``fn``, finished (synchronised) when it returns."""
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def channel_multiple(self) -> int:
        """Channel counts this runtime's fast kernels need multiples of (1: any). The
        runtime-aware allocator keeps widths at multiples of it as well as of ``round_to``."""
        return 1


class TorchRuntime(Runtime):
    name = "torch"
    description = "PyTorch eager on the CPU"

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Callable[[], Any]:
        if model is None:
            raise ConfigError(f"runtime {self.name!r} runs a PyTorch module, not an ONNX file")

        import torch

        def run() -> None:
            with torch.inference_mode():
                model(x)
        return run

    def layer_runner(self, layer: LayerProgram, threads: int) -> Callable[[], Any] | None:
        import torch

        fn, args = layer.torch, layer.inputs
        if fn is None:
            return None

        def run() -> None:
            with torch.inference_mode():
                fn(*args)
        return run


class CudaRuntime(TorchRuntime):
    name = "cuda"
    description = "PyTorch on the first CUDA device"

    def missing(self) -> str | None:
        import torch

        return None if torch.cuda.is_available() else (
            "was requested but no CUDA GPU is visible to PyTorch on this machine; drop it from "
            "the runtimes")

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Callable[[], Any]:
        on_gpu = None if model is None else copy.deepcopy(model).to("cuda")
        return super().model_runner(on_gpu, x.to("cuda"), None, threads)

    def layer_runner(self, layer: LayerProgram, threads: int) -> Callable[[], Any] | None:
        on_gpu = LayerProgram([t.to("cuda") for t in layer.inputs], layer.torch)
        return super().layer_runner(on_gpu, threads)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))


class FusedTorchRuntime(TorchRuntime):
    """PyTorch eager in deploy form: every BatchNorm folded into the conv before it
    (``torch.fx.experimental.optimization.fuse``), as ONNX Runtime does on its own, so eager
    timings compare like with like. A model torch.fx cannot trace runs unfused."""

    name = "torch-fused"
    description = "PyTorch eager, BatchNorm folded into convs"

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Callable[[], Any]:
        return super().model_runner(None if model is None else fused(model), x, onnx, threads)

    def layer_runner(self, layer: LayerProgram, threads: int) -> Callable[[], Any] | None:
        return None if layer.folds else super().layer_runner(layer, threads)


def fused(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the conv before it (the
    model itself is untouched); the copy unfused where torch.fx cannot trace the model."""
    import warnings

    from torch.fx.experimental.optimization import fuse

    frozen = copy.deepcopy(model).eval()
    try:
        return fuse(frozen)
    except Exception as e:  # fx cannot trace it: time it as it is, and say so
        warnings.warn(f"{type(model).__name__} runs unfused on torch-fused: torch.fx cannot "
                      f"trace it ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                      stacklevel=2)
        return frozen


class OrtRuntime(Runtime):
    """ONNX Runtime with one execution provider; ``session.run`` returns when the work is done."""

    form = "onnx"

    def __init__(self, name: str, provider: str, description: str) -> None:
        self.name, self.provider, self.description = name, provider, description

    def missing(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "needs onnxruntime: pip install onnxruntime"
        providers = ort.get_available_providers()
        if self.provider not in providers:
            return (f"needs ONNX Runtime's {self.provider}, which this onnxruntime does not have "
                    f"(available: {', '.join(providers)}); install the build that has it "
                    "(onnxruntime-gpu for CUDA)")
        return None

    def session(self, model: str | bytes, threads: int | None, profile: str | None = None) -> Any:
        """A session with explicit threads and no spinning worker threads (spinning threads of
        several live sessions steal cores from each other); ``profile``: a file prefix for ONNX
        Runtime's op profiler."""
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeMissingError("onnxruntime is not installed; pip install onnxruntime "
                                      "(or use ./run, which installs it)") from e
        if self.provider not in ort.get_available_providers():
            raise RuntimeMissingError(f"ONNX Runtime provider {self.provider} is not available "
                                      f"here (available: {ort.get_available_providers()})")

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.log_severity_level = 3
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile
        return ort.InferenceSession(model, sess_options=opts, providers=[self.provider])

    def model_runner(self, model: nn.Module | None, x: torch.Tensor, onnx: str | None,
                     threads: int) -> Callable[[], Any]:
        if onnx is None:
            raise ConfigError(f"runtime {self.name!r} runs an ONNX file: export the model first")
        sess = self.session(str(onnx), threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: sess.run(None, feed)

    def channel_multiple(self) -> int:
        """On the CPU, ONNX Runtime's blocked-layout (NCHWc) convolutions take only channel
        counts that are multiples of MLAS's vector block (16 floats with AVX-512, 8 with AVX2);
        any other count falls back to a plain convolution with layout reorders around it."""
        if self.provider != "CPUExecutionProvider":
            return 1
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        return 16 if capability.startswith("AVX512") else 8 if capability == "AVX2" else 1

    def layer_runner(self, layer: LayerProgram, threads: int) -> Callable[[], Any] | None:
        if layer.onnx_nodes is None:
            return None
        sess = self.session(layer.onnx_model(), threads)
        feed = {"x": layer.inputs[0].numpy()}
        return lambda: sess.run(None, feed)


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime, *, replace: bool = False) -> Runtime:
    """Add a runtime under ``runtime.name``; raises on a taken name unless ``replace``."""
    if not runtime.name:
        raise ValueError("a runtime needs a name")
    if runtime.name in _RUNTIMES and not replace:
        raise ValueError(f"a runtime named {runtime.name!r} is already registered; pass "
                         "replace=True to override")
    _RUNTIMES[runtime.name] = runtime
    return runtime


def get_runtime(name: str | Runtime) -> Runtime:
    """The runtime registered as ``name`` (a :class:`Runtime` passes through)."""
    if isinstance(name, Runtime):
        return name
    rt = _RUNTIMES.get(name) if isinstance(name, str) else None
    if rt is None:
        raise ConfigError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}")
    return rt


def runtime_names() -> list[str]:
    """Names of the registered runtimes, in registration order."""
    return list(_RUNTIMES)


def ort_session(model: str | os.PathLike[str] | bytes, threads: int | None = None,
                provider: str = "CPUExecutionProvider") -> Any:
    """An ONNX Runtime session with the benchmark's options on ``provider``."""
    rt = next((r for r in _RUNTIMES.values()
               if isinstance(r, OrtRuntime) and r.provider == provider),
              OrtRuntime(provider, provider, provider))
    return rt.session(model if isinstance(model, bytes) else str(model), threads)


def check_all(names: Sequence[str]) -> list[Runtime]:
    """The runtimes named, each checked to be available here."""
    out = [get_runtime(n) for n in names]
    for rt in out:
        rt.check()
    return out


register_runtime(TorchRuntime())
register_runtime(CudaRuntime())
register_runtime(OrtRuntime("ort", "CPUExecutionProvider", "ONNX Runtime on the CPU"))
register_runtime(OrtRuntime("ort-cuda", "CUDAExecutionProvider",
                            "ONNX Runtime with its CUDA execution provider"))
register_runtime(FusedTorchRuntime())
