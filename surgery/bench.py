"""Latency that tells the truth: alternating runs, explicit threads, medians, efficiency.

Models under test run in turns (A B A B …) so machine drift does not bias their ratio. Every call is
timed separately; the report keeps median, p90, p99 and throughput per model, runtime and batch,
plus params and MACs. For every model measured against a baseline:

    speedup    = baseline median / model median
    mac_ratio  = baseline MACs / model MACs          (the ideal speedup)
    efficiency = speedup / mac_ratio                  (1.0 = as fast as the arithmetic saved)
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, ExampleInputError
from .export import export_onnx
from .modes import switched_mode
from .runtimes import OrtRuntime, Runtime, check_all, get_runtime, runtime_names
from .stats import count_macs, count_params


@dataclass(frozen=True)
class Measurement:
    model: str
    runtime: str
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float  # samples per second at the median
    samples: int
    params: int
    macs: int  # per sample
    onnx_bytes: int | None = None
    speedup: float | None = None
    mac_ratio: float | None = None
    efficiency: float | None = None
    speedup_p10: float | None = None  # the speedup's spread over the alternating rounds
    speedup_p90: float | None = None
    speedup_ci_low: float | None = None  # bootstrap 95% interval of the median speedup
    speedup_ci_high: float | None = None


@dataclass
class BenchReport:
    """Measurements plus the environment they were taken in. Data first; text on request."""

    env: dict[str, Any]
    rows: list[Measurement] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"env": self.env, "rows": [asdict(r) for r in self.rows]}, indent=1)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(Measurement.__dataclass_fields__))
        w.writeheader()
        for r in self.rows:
            w.writerow(asdict(r))
        return buf.getvalue()

    def to_markdown(self) -> str:
        head = ("| model | runtime | batch | median ms | p90 ms | p99 ms | samples/s | params | "
                "MACs | speedup | MAC ratio | efficiency |")
        lines = [head, "|" + "---|" * 12]
        for r in self.rows:
            opt = [f"{v:.2f}" if v is not None else "" for v in (r.speedup, r.mac_ratio,
                                                                 r.efficiency)]
            lo, hi = r.speedup_ci_low, r.speedup_ci_high
            if r.speedup is not None and lo is not None and hi is not None:
                opt[0] += f" ({lo:.2f}–{hi:.2f})"
                if r.efficiency is not None and r.mac_ratio:
                    opt[2] += f" ({lo / r.mac_ratio:.2f}–{hi / r.mac_ratio:.2f})"
            lines.append(f"| {r.model} | {r.runtime} | {r.batch} | {r.median_ms:.2f} | "
                         f"{r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.throughput:.1f} | "
                         f"{r.params / 1e6:.2f}M | {r.macs / 1e6:.0f}M | " + " | ".join(opt) + " |")
        env = ", ".join(f"{k}={v}" for k, v in self.env.items() if k != "warning")
        text = "\n".join(lines) + ("\n\nMedians of alternating runs; speedup and efficiency "
                                   "with a bootstrap 95% interval of the median (rounds "
                                   f"resampled in pairs). Environment: {env}\n")
        if "warning" in self.env:
            text = f"**warning**: {self.env['warning']}\n\n{text}"
        return text


def busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes keep busy right now (from /proc/stat over ``seconds``;
    the 1-minute load average where /proc/stat is missing). This process sleeps meanwhile."""
    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)

    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    if total1 <= total0:
        return 0.0
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def free_threads() -> tuple[int, float]:
    """Threads that fit the cores other processes leave free, and how many cores were busy."""
    busy = busy_cores()
    return max(1, (os.cpu_count() or 1) - round(busy)), busy


def environment(threads: int, runtimes: Sequence[str]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": cpu, "cores": os.cpu_count(), "threads": threads,
                           "runtimes": ",".join(runtimes)}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def bench(models: Mapping[str, nn.Module | None], input_shape: Sequence[int] = (3, 224, 224), *,
          runtimes: Sequence[str] = ("torch", "ort"), batches: Sequence[int] = (1,),
          threads: int | None = None, baseline: str | None = None, warmup: int = 3,
          rounds: int = 20, min_round_ms: float = 30.0, workdir: str | None = None,
          onnx_files: Mapping[str, str] | None = None,
          progress: Callable[[str], None] | None = None) -> BenchReport:
    """Time ``models`` (name -> module, inputs of ``(batch, *input_shape)``) on each runtime.

    A model given as None must have a file in ``onnx_files``; it runs on ONNX Runtime only.

    Args:
        baseline: the name every other model is compared with (default: the first).
        threads: CPU threads for PyTorch and ONNX Runtime (default: the cores other processes
            leave free; the report warns when the machine was busy).
        rounds: turns of A B A B …; each turn runs each model for at least ``min_round_ms``.
        onnx_files: already exported (and parity-checked) ONNX files by model name; the others
            are exported to a temporary folder.

    Example:
        >>> report = surgery.bench({"resnet18": model, "pruned": small}, batches=[1, 8])
        >>> print(report.to_markdown())
    """
    if not models:
        raise ConfigError("bench needs at least one model")
    check_all(runtimes)
    auto, busy = free_threads()
    threads = threads or auto
    baseline = baseline or next(iter(models))
    if baseline not in models:
        raise ConfigError(f"baseline {baseline!r} is not among the models {list(models)}")
    report = BenchReport(environment(threads, runtimes))
    report.env["busy_cores_before"] = round(busy, 2)
    if busy + threads > (os.cpu_count() or 1) + 0.5:
        report.env["warning"] = (
            f"other processes kept {busy:.1f} of {os.cpu_count()} cores busy while {threads} "
            "threads were asked for: these timings are unreliable; run on a quiet machine or "
            "with fewer --threads")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmpdir = tempfile.TemporaryDirectory(dir=workdir)
    try:
        sample = torch.randn(1, *input_shape)
        onnx_paths: dict[str, str] = dict(onnx_files or {})
        for name, m in models.items():
            if m is None and name not in onnx_paths:
                raise ConfigError(f"model {name!r} is None but has no file in onnx_files")
        stats = {n: (count_params(m), _macs(n, m, sample)) if m is not None else
                 (_onnx_weights(onnx_paths[n]), 0) for n, m in models.items()}
        onnx_bytes = {n: os.path.getsize(p) for n, p in onnx_paths.items()}
        if any(get_runtime(rt).form == "onnx" for rt in runtimes):
            for name, m in models.items():
                if name in onnx_paths:
                    continue
                assert m is not None  # a model given as None has a file (checked above)
                if progress:
                    progress(f"exporting {name} to ONNX")
                p = os.path.join(tmpdir.name, f"{len(onnx_paths)}.onnx")
                onnx_bytes[name] = export_onnx(m, sample, p).file_bytes
                onnx_paths[name] = p
        for rt_name in runtimes:
            rt = get_runtime(rt_name)
            for b in batches:
                if progress:
                    progress(f"timing {len(models)} model{'s' * (len(models) != 1)} on {rt.name}, "
                             f"batch {b}")
                runnable = {n: m for n, m in models.items()
                            if m is not None or rt.form == "onnx"}
                times = _alternate(runnable, rt, b, input_shape, onnx_paths, threads, warmup,
                                   rounds, min_round_ms)
                base = float(np.median(times[baseline])) if baseline in times else None
                for name, t in times.items():
                    med = float(np.median(t))
                    params, macs = stats[name]
                    rel = name != baseline and base is not None
                    speedup = base / med if rel and base is not None else None
                    mac_ratio = stats[baseline][1] / macs if rel and macs else None
                    spread = _spread(times[baseline], t, rounds) if rel else (None,) * 4
                    report.rows.append(Measurement(
                        name, rt.name, b, threads, med, float(np.percentile(t, 90)),
                        float(np.percentile(t, 99)), b * 1e3 / med, len(t), params, macs,
                        onnx_bytes.get(name) if rt.form == "onnx" else None, speedup,
                        mac_ratio, speedup / mac_ratio if speedup and mac_ratio else None,
                        *spread))
    finally:
        torch.set_num_threads(old_threads)
        tmpdir.cleanup()
    after = busy_cores(0.1)
    report.env["busy_cores_after"] = round(after, 2)
    if "warning" not in report.env and after > 0.75:
        report.env["warning"] = (f"other processes kept {after:.1f} cores busy by the end of the "
                                 "run: these timings may be unreliable")
    return report


def _macs(name: str, model: nn.Module, sample: torch.Tensor) -> int:
    """MACs of one forward, or a clear error when the model does not take this input."""
    try:
        return count_macs(model, sample)
    except Exception as e:  # the model's own error on a wrong input: the user's input
        raise ExampleInputError(
            f"model {name!r} fails on an input of shape {tuple(sample.shape)}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; give the input "
            "shape it expects (--input-shape N,C,H,W)") from e


def _spread(base: Sequence[float], t: Sequence[float], rounds: int
            ) -> tuple[float | None, float | None, float | None, float | None]:
    """The speedup's 10th-90th percentile over rounds (each round times both models in turn,
    each a few times: the round's median of each is compared), and a bootstrap 95% interval of
    the median speedup (rounds resampled in pairs, so drift hits both models alike)."""
    if rounds < 3 or len(base) % rounds or len(t) % rounds:
        return None, None, None, None
    a = np.asarray(base).reshape(rounds, -1)
    b = np.asarray(t).reshape(rounds, -1)
    ratios = np.median(a, axis=1) / np.median(b, axis=1)
    pick = np.random.default_rng(0).integers(0, rounds, (2000, rounds))
    boot = np.median(a[pick].reshape(2000, -1), axis=1) / np.median(b[pick].reshape(2000, -1),
                                                                   axis=1)
    return (float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90)),
            float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)))


def _onnx_weights(path: str) -> int:
    import onnx

    return sum(int(np.prod(i.dims)) for i in onnx.load(path).graph.initializer)


def _alternate(models: Mapping[str, nn.Module | None], rt: Runtime, batch: int,
               shape: Sequence[int],
               onnx_paths: Mapping[str, str], threads: int, warmup: int, rounds: int,
               min_round_ms: float) -> dict[str, list[float]]:
    x = torch.randn(batch, *shape)
    with switched_mode(*models.values()):
        runners = {name: rt.model_runner(m, x, onnx_paths.get(name), threads)
                   for name, m in models.items()}
        reps: dict[str, int] = {}
        for name, fn in runners.items():
            first = [rt.time_ms(fn) for _ in range(warmup)][-1]
            reps[name] = max(1, int(min_round_ms / max(first, 1e-3)))
        times: dict[str, list[float]] = {n: [] for n in runners}
        for _ in range(rounds):
            for name, fn in runners.items():
                times[name] += [rt.time_ms(fn) for _ in range(reps[name])]
        return times


def ort_op_profile(onnx_path: str, input_shape: Sequence[int], *, threads: int = 1,
                   runs: int = 20, runtime: str = "ort") -> dict[str, float]:
    """Milliseconds per run spent in each ONNX op type, from ONNX Runtime's own profiler.

    Explains where a pruned model's time goes when its speedup falls short of its MAC ratio
    (e.g. memory-bound depthwise convs or elementwise ops that pruning shrinks less than convs).
    """
    ort = get_runtime(runtime)
    if not isinstance(ort, OrtRuntime):
        onnx_ones = [n for n in runtime_names() if isinstance(get_runtime(n), OrtRuntime)]
        raise ConfigError(f"runtime {runtime!r} is not ONNX Runtime; profile on one of "
                          f"{onnx_ones}")
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.session(onnx_path, threads, profile=os.path.join(tmp, "ort_profile"))
        feed = {session.get_inputs()[0].name: np.random.randn(*input_shape).astype(np.float32)}
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    import onnx

    grouped = {n.name for n in onnx.load(onnx_path).graph.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            if e["name"][: -len("_kernel_time")] in grouped:
                op += " (grouped/depthwise)"
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def models_to_bench(specs: Sequence[str], model_args: Mapping[str, Any] | None = None, *,
                    trust_code: bool = False, input_shape: Sequence[int] | None = None
                    ) -> tuple[dict[str, nn.Module | None], dict[str, str], tuple[int, ...]]:
    """Models named as the command line names them, ready for :func:`bench`: specs, saved
    directories (timed beside the original they were pruned from, with their parity-checked
    ``model.onnx`` where the shape matches) and ``.onnx`` files. Returns the models, the ONNX
    files and the input shape (given, else the first saved one, else 1x3x224x224)."""
    from . import artifact

    nets: dict[str, nn.Module | None] = {}
    onnx_files: dict[str, str] = {}
    shape = tuple(input_shape) if input_shape else None
    for spec in specs:
        if spec.endswith(".onnx"):
            if not os.path.isfile(spec):
                raise ConfigError(f"ONNX file {spec} does not exist")
            nets[spec], onnx_files[spec] = None, spec
            continue
        net, meta = artifact.load_any(spec, model_args, trust_code=trust_code)
        shape = shape or tuple(meta.get("input_shape") or (1, 3, 224, 224))
        if not os.path.isdir(spec):
            nets[spec] = net
            continue
        nets[meta["spec"]] = artifact.build_original(spec, meta, trust_code=trust_code)
        nets[f"{spec} (pruned)"] = net
        saved = Path(spec) / "model.onnx"
        if saved.is_file() and tuple(shape[1:]) == tuple(meta["input_shape"][1:]):
            onnx_files[f"{spec} (pruned)"] = str(saved)  # parity-checked at prune time
    return nets, onnx_files, shape or (1, 3, 224, 224)
