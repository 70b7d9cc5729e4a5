"""prune(): plan + apply + verify in one call."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from .errors import ConfigError
from .graph import Inputs, trace
from .latency import latency_plan
from .plan import Plan, make_plan
from .runtimes import runtime_names
from .stats import count_macs
from .surgeon import apply
from .verify import verify as check


def prune(model: nn.Module, example_inputs: Inputs, *, ratio: float | None = None,
          criterion: str = "l2", round_to: int = 8, ignore: Sequence[str] = (), seed: int = 0,
          verify: bool = True, target_macs: float | None = None, allocate: str = "uniform",
          threads: int = 1, exact: bool = False) -> nn.Module:
    """A new, physically smaller model with ``ratio`` of every group's channels removed.

    The input model is never modified. With ``verify`` (default) the result is checked against
    the original with the removed channels zeroed and a :class:`VerificationError` is raised on
    any difference. ``target_macs`` (a fraction of the original MACs) replaces ``ratio``.
    ``allocate="ort"`` or ``"torch"`` removes as many MACs as ``ratio`` would, from the layers where
    that runtime (timed here with ``threads`` threads) saves the most time
    (:func:`surgery.latency_plan`); ``"uniform"`` removes ``ratio`` of every group. ``exact``
    keeps the channels that pass a cross-channel norm (a transformer's embedding width), so the
    result is exactly equivalent (see :func:`surgery.plan`).

    Example:
        >>> small = surgery.prune(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224),
        ...                       ratio=0.5)
    """
    if ratio is not None and target_macs is not None:
        raise ConfigError("give exactly one of ratio= or target_macs=")
    if allocate not in ("uniform", *runtime_names()):
        raise ConfigError(f"allocate must be 'uniform' or a runtime to allocate for "
                          f"({', '.join(runtime_names())}), not {allocate!r}")
    if allocate != "uniform":
        if target_macs is not None:
            raise ConfigError("target_macs= works with allocate='uniform' only; give ratio= "
                              "(the latency-aware plan removes as many MACs as that ratio)")
        plan = latency_plan(model, example_inputs, ratio=ratio, runtime=allocate,  # type: ignore[arg-type]
                            threads=threads, criterion=criterion, round_to=round_to,
                            ignore=ignore, seed=seed)
    elif target_macs is not None:
        plan = plan_for_macs(model, example_inputs, target_macs=target_macs, criterion=criterion,
                             round_to=round_to, ignore=ignore, seed=seed)
    else:  # a missing ratio is reported by make_plan, with the range it takes
        plan = make_plan(model, example_inputs, ratio=ratio, criterion=criterion,  # type: ignore[arg-type]
                         round_to=round_to, ignore=ignore, seed=seed, exact=exact)
    small = apply(model, plan)
    if verify:
        check(model, small, plan, example_inputs)
    return small


#: a MAC target is met when the plan keeps at most the target and at most this much below it
LANDING = 0.05


def plan_for_macs(model: nn.Module, example_inputs: Inputs, *, target_macs: float,
                  criterion: str = "l2", round_to: int = 8, ignore: Sequence[str] = (),
                  seed: int = 0, tolerance: float = 0.01) -> Plan:
    """The plan with the smallest uniform ratio whose model keeps at most ``target_macs`` of the
    original MACs (e.g. 0.5 = half), found by bisection on the ratio. Where ``round_to`` makes
    the steps too coarse to land within 5 points below the target (16 channels round to 8 or 16),
    it is retried with ``round_to=1``; where it still lands further below, the plan's
    ``settings["warnings"]`` says how far and why (``settings["macs_kept"]``: what it keeps).

    Example:
        >>> plan = surgery.plan_for_macs(model, x, target_macs=0.5)
    """
    if not 0 < target_macs < 1:
        raise ConfigError(f"target_macs must be a fraction in (0, 1) but received {target_macs!r}")
    graph = trace(model, example_inputs, ignore=ignore)
    full = count_macs(model, example_inputs)

    def attempt(ratio: float, step: int) -> tuple[Plan, float]:
        p = make_plan(model, example_inputs, ratio=ratio, criterion=criterion,
                      round_to=step, ignore=ignore, seed=seed, graph=graph)
        return p, count_macs(apply(model, p), example_inputs) / full

    def search(step: int) -> tuple[Plan, float]:
        lo, hi = 0.0, 0.99
        best, best_kept = attempt(hi, step)
        if best_kept > target_macs:
            raise ConfigError(f"even ratio {hi} keeps {best_kept:.2f} of the MACs, more than the "
                              f"target {target_macs}; the rest is in layers that cannot be "
                              "pruned (see surgery.trace(...).explain)")
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            p, kept = attempt(mid, step)
            if kept <= target_macs:
                best, best_kept, hi = p, kept, mid
            else:
                lo = mid
        return best, best_kept

    asked = round_to
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the intermediate plans' warnings are not the answer's
        best, kept = search(asked)
        notes = []
        if target_macs - kept > LANDING and asked > 1:  # the rounding steps are too coarse here
            finer, finer_kept = search(1)
            if finer_kept > kept:
                notes.append(f"round_to={asked} could only reach {kept:.1%} of the MACs for "
                             f"target_macs={target_macs}; used round_to=1 (finer steps), "
                             f"reaching {finer_kept:.1%}")
                best, kept = finer, finer_kept
    if target_macs - kept > LANDING:
        notes.append(f"target_macs={target_macs} landed at {kept:.1%} of the MACs (more than "
                     f"{LANDING:.0%} below): the channel steps of this model's groups are that "
                     "coarse")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    settings = {**best.settings, "target_macs": target_macs, "macs_kept": round(kept, 4)}
    if notes:
        settings["warnings"] = [*settings.get("warnings", []), *notes]
    return Plan(best.model_class, best.fingerprint, best.layers, best.exact, settings)
