"""What to prune, as data: a typed, JSON-round-trippable configuration.

One config object says how much to remove and how to choose; :func:`surgery.plan` and
:func:`surgery.prune` take it, the command line builds it from its flags, and every plan records
it (``plan.settings["config"]``), so a plan says how it was made::

    surgery.prune(model, x, surgery.Uniform(0.5))
    surgery.prune(model, x, surgery.MacBudget(0.25))                  # keep 25% of the MACs
    surgery.prune(model, x, surgery.RuntimeAware(0.5, runtime="ort"))  # same MACs, faster layout
    surgery.prune(model, x, surgery.LatencyTarget(speedup=2, runtime="ort", threads=2))  # measured
    surgery.Uniform(0.5, overrides={"layer4.0.conv1": 0.2, "re:^fc": 0.0})

``overrides`` set another ratio for the groups of the layers named (a name or ``re:`` regex;
as ``ignore=`` takes them: a parent's name covers its layers; the first match wins; ``0.0``
keeps them whole).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["LatencyTarget", "MacBudget", "PruneConfig", "RuntimeAware", "Uniform",
           "config_from_dict"]


def _ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1) but received {value!r}")


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """Settings every strategy shares.

    Args:
        criterion: a registered criterion name (``l1``, ``l2``, ``bn_scale``, ``random``).
        round_to: keep channel counts multiples of this, rounding up (1: exact counts).
        ignore: layer names or ``re:`` regexes to keep as they are.
        seed: for the ``random`` criterion.
        exact: leave whole the groups that pass a cross-channel norm (a transformer's embedding
            width), so the plan stays exactly equivalent.
        overrides: layer name or ``re:`` regex -> the ratio of the groups that layer is in.
    """

    criterion: str = "l2"
    round_to: int = 8
    ignore: tuple[str, ...] = ()
    seed: int = 0
    exact: bool = False
    overrides: Mapping[str, float] = field(default_factory=dict)

    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not isinstance(self.criterion, str):
            raise ConfigError(f"criterion must be a name but received {self.criterion!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) \
                or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive int but received {self.round_to!r}")
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not isinstance(self.overrides, Mapping):
            raise ConfigError(f"overrides must map layer names to ratios but received "
                              f"{self.overrides!r}")
        for key, value in self.overrides.items():
            _ratio(f"overrides[{key!r}]", value)
            if isinstance(key, str) and key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ConfigError(f"overrides key {key!r} is not a valid regex: {e}") from e
        object.__setattr__(self, "overrides", dict(self.overrides))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"kind": "Uniform", "ratio": 0.5, ...}``."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(
                v, Mapping) else v
        return out

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Uniform(PruneConfig):
    """Remove ``ratio`` of every coupled group's prunable channels."""

    ratio: float
    kind: ClassVar[str] = "Uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        _ratio("ratio", self.ratio)


@dataclass(frozen=True)
class MacBudget(PruneConfig):
    """Keep at most ``keep`` of the original MACs (e.g. 0.25 = a quarter), with the smallest
    uniform ratio that gets there."""

    keep: float
    kind: ClassVar[str] = "MacBudget"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.keep, bool) or not isinstance(self.keep, int | float) \
                or not 0 < self.keep < 1:
            raise ConfigError(f"keep (the fraction of MACs kept) must be in (0, 1) but received "
                              f"{self.keep!r}")


@dataclass(frozen=True)
class RuntimeAware(PruneConfig):
    """Remove as many MACs as the uniform ``ratio`` would, from the layers where ``runtime``
    (timed here with ``threads`` threads) saves the most time; ``budget="latency"`` stops at
    the uniform plan's estimated time instead. With ``compare`` (default) the result is timed
    whole against the uniform plan on the runtime and the uniform plan is returned where it
    measures faster (``plan.settings["compared"]``).

    ``batch``: the batch size timed, on random inputs shaped like the example; the example
    inputs then only score channels and, with ``depth``, blocks (pass a batch of real images
    and ``batch=1``). None (default): the example inputs are timed, at their own batch."""

    ratio: float
    runtime: str = "ort"
    threads: int = 1
    budget: str = "macs"
    max_ratio: float | None = None
    #: also bypass whole residual bodies and gates where that saves more time (depth pruning)
    depth: bool = False
    #: time the laid-out plan's and the uniform plan's whole models on the runtime and keep
    #: the faster (the per-layer timings miss fusions and memory traffic between layers)
    compare: bool = True
    #: the batch size timed on random inputs (the example inputs then only score); None: the
    #: example inputs are timed
    batch: int | None = None
    kind: ClassVar[str] = "RuntimeAware"

    def __post_init__(self) -> None:
        super().__post_init__()
        _ratio("ratio", self.ratio)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) \
                or self.threads < 1:
            raise ConfigError(f"threads must be a positive int but received {self.threads!r}")
        if self.batch is not None and (isinstance(self.batch, bool) or not isinstance(
                self.batch, int) or self.batch < 1):
            raise ConfigError(f"batch must be a positive int (RuntimeAware times one batch "
                              f"size) or None but received {self.batch!r}")
        if not isinstance(self.compare, bool):
            raise ConfigError(f"compare must be True or False but received {self.compare!r}")
        if self.overrides:
            raise ConfigError("overrides work with Uniform and MacBudget; RuntimeAware chooses "
                              "every group's width itself (use ignore= to keep layers whole)")


@dataclass(frozen=True)
class LatencyTarget(PruneConfig):
    """Prune until the whole model, measured on ``runtime`` (``threads`` threads, ``batch``),
    is ``speedup`` times faster than the original (or runs in ``latency_ms``): plan, build,
    time, correct the ratio, repeat (at most ``rounds`` times), landing in
    ``[target, (1 + tolerance) * target]``. ``allocate`` lays each round's plan out where the
    runtime saves most (as :class:`RuntimeAware`); else uniformly.

    ``batch`` may be several sizes, e.g. ``(1, 8)``: every round is timed at each, and the
    speedup that must land is their geometric mean weighted by ``batch_weights`` (equal by
    default), so a plan for batch 1 does not lose at batch 8. Layers are timed at the first.
    Timing uses random inputs at those batches; the example inputs given with the config score
    channels and, with ``depth``, each block's loss (pass a batch of real images there).

    ``floor_batch`` (e.g. 8) guards other batch sizes without weighing them: a landing is also
    timed there, and kept only if each reaches ``floor`` x the target speedup; where one falls
    short, the search aims higher in the range at ``batch``, by the shortfall."""

    speedup: float | None = None
    latency_ms: float | None = None
    runtime: str = "ort"
    threads: int = 1
    batch: int | tuple[int, ...] = 1
    batch_weights: tuple[float, ...] | None = None
    tolerance: float = 0.15
    rounds: int = 8
    floor_batch: int | tuple[int, ...] = ()
    floor: float = 0.9
    allocate: bool = True
    #: with ``allocate``: also bypass whole residual bodies and gates (depth pruning)
    depth: bool = False
    kind: ClassVar[str] = "LatencyTarget"

    @property
    def batches(self) -> tuple[int, ...]:
        """The batch sizes timed, the first one also for the per-layer timings."""
        return self.batch if isinstance(self.batch, tuple) else (self.batch,)

    @property
    def floor_batches(self) -> tuple[int, ...]:
        """The batch sizes a landing must not lose at (timed only to confirm a landing)."""
        return self.floor_batch if isinstance(self.floor_batch, tuple) else (self.floor_batch,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.speedup is None) == (self.latency_ms is None):
            raise ConfigError("give exactly one of speedup= (e.g. 2.0) or latency_ms=")
        for name in ("speedup", "latency_ms"):
            v = getattr(self, name)
            low = 1 if name == "speedup" else 0
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or v <= low):
                raise ConfigError(f"{name} must be a number above {low} but received {v!r}")
        for name in ("threads", "rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int but received {v!r}")
        if isinstance(self.batch, list | tuple):
            object.__setattr__(self, "batch", tuple(self.batch))
        sizes = self.batches
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                            for b in sizes) or len(set(sizes)) != len(sizes):
            raise ConfigError(f"batch must be a positive int or distinct positive ints but "
                              f"received {self.batch!r}")
        if isinstance(self.floor_batch, list | tuple):
            object.__setattr__(self, "floor_batch", tuple(self.floor_batch))
        guarded = self.floor_batches
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in guarded) or len(
                set(guarded)) != len(guarded):
            raise ConfigError(f"floor_batch must be a positive int or distinct positive ints "
                              f"but received {self.floor_batch!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, int | float) or not (
                0 < self.floor <= 1):
            raise ConfigError(f"floor must be in (0, 1] (a fraction of the target speedup) but "
                              f"received {self.floor!r}")
        if self.batch_weights is not None:
            object.__setattr__(self, "batch_weights", tuple(self.batch_weights))
            w = self.batch_weights
            if len(w) != len(sizes) or any(isinstance(v, bool) or not isinstance(v, int | float)
                                           or v <= 0 for v in w):
                raise ConfigError(f"batch_weights must be {len(sizes)} positive numbers (one "
                                  f"per batch size) but received {w!r}")
        if self.latency_ms is not None and len(sizes) > 1:
            raise ConfigError("a latency_ms target is for one batch size; give speedup= to "
                              "weigh several")
        if not isinstance(self.tolerance, int | float) or not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance must be in (0, 1) but received {self.tolerance!r}")
        if self.depth and not self.allocate:
            raise ConfigError("depth=True needs allocate=True: the runtime-aware allocator "
                              "weighs bypassed blocks against narrower layers")
        if self.overrides:
            raise ConfigError("overrides work with Uniform and MacBudget; LatencyTarget chooses "
                              "the ratio itself (use ignore= to keep layers whole)")


_KINDS: dict[str, type[PruneConfig]] = {c.kind: c for c in (Uniform, MacBudget, RuntimeAware,
                                                            LatencyTarget)}


def config_from_dict(data: Mapping[str, Any]) -> PruneConfig:
    """The config ``to_dict`` wrote (a plan's ``settings["config"]``)."""
    if not isinstance(data, Mapping) or data.get("kind") not in _KINDS:
        raise ConfigError(f"not a prune config: {data!r}; expected a dict with kind one of "
                          f"{sorted(_KINDS)}")
    cls = _KINDS[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ConfigError(f"{data['kind']} has no setting {', '.join(unknown)}; it takes "
                          f"{', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in data.items() if k != "kind"}
    return cls(**kwargs)


def override_for(config: PruneConfig, paths: list[str]) -> float | None:
    """The override ratio of a group whose layers are ``paths``: the first override (in the
    config's order) that names one of them; None when none does."""
    from .graph import matches  # names as ignore= takes them: a layer, a parent, re:regex

    for key, value in config.overrides.items():
        if any(matches(p, [key]) for p in paths):
            return float(value)
    return None


def parse_overrides(items: Sequence[str]) -> dict[str, float]:
    """``LAYER=RATIO`` strings (command-line ``--override``) as an overrides dict; the last
    ``=`` splits, so a regex may hold one."""
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            name = ""
        if not name:
            raise ConfigError(f"--override takes LAYER=RATIO (e.g. layer4=0.2 or 're:^fc$=0'), "
                              f"not {item!r}")
    return out
