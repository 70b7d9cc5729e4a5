"""The plan: which channels every layer keeps. Plain data, JSON round-trip, re-appliable.

A plan names layers by qualified name and lists, per axis, the original size and the sorted
indices that survive. It records the fingerprint of the architecture it was made for, so applying
it to another architecture is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import write_text
from .collector import pauses_collector
from .config import Uniform, override_for
from .criteria import get_criterion
from .depth import Bypass, outermost
from .errors import ConfigError, NothingToPruneError, PlanError
from .graph import ChannelGraph, Inputs, trace
from .groups import Group, unique_ints
from .kept_sites import KeptSite
from .paths import Submodules

FORMAT = "surgery-plan"
VERSION = 1


@dataclass(frozen=True)
class AxisPlan:
    size: int
    keep: tuple[int, ...]

    def kept(self) -> torch.Tensor:
        """The kept positions as an index tensor (for gathers and ``index_select``)."""
        return torch.from_numpy(np.fromiter(self.keep, np.int64, len(self.keep)))

    def removed(self) -> torch.Tensor:
        """The removed positions, ascending, as an index tensor."""
        mask = np.ones(self.size, bool)
        mask[np.fromiter(self.keep, np.int64, len(self.keep))] = False
        return torch.from_numpy(np.flatnonzero(mask))


@dataclass(frozen=True)
class LayerPlan:
    kind: str  # "module": shrunk by its rule; "param": a tensor sliced along int(axis)
    cls: str
    axes: dict[str, AxisPlan]


@dataclass(frozen=True)
class Plan:
    """Kept channel indices per layer and axis, for one architecture."""

    model_class: str
    fingerprint: str
    layers: dict[str, LayerPlan]
    exact: bool = True  # equivalence with the zeroed original is defined (no cross-channel norm)
    settings: dict[str, Any] = field(default_factory=dict)
    #: module attributes the forward uses as sizes, rewritten to the count kept:
    #: module path -> attribute -> (original value, kept positions) (e.g. heads kept)
    attributes: dict[str, dict[str, AxisPlan]] = field(default_factory=dict)
    #: depth pruning: ops replaced by one operand (a residual body or a gate that stops running),
    #: made before the layers shrink (see :mod:`surgery.depth`)
    bypasses: tuple[Bypass, ...] = ()
    #: where ``exact`` is False but every cross-channel op the removed channels pass can run on
    #: the kept channels alone: those ops and what each keeps (the verification reference runs
    #: them so and compares values: :mod:`surgery.kept_sites`). None: shapes only
    kept_sites: tuple[KeptSite, ...] | None = None

    @property
    def checks_values(self) -> bool:
        """Whether verification compares values (else output shapes only)."""
        return self.exact or self.kept_sites is not None

    def with_settings(self, settings: dict[str, Any]) -> Plan:
        """The same plan with other settings."""
        return dataclasses.replace(self, settings=settings)

    def bypassing(self, bypasses: Sequence[Bypass]) -> Plan:
        """This plan with ``bypasses`` made first; the layers they remove leave the plan."""
        outer = tuple(outermost([*self.bypasses, *bypasses]))
        gone = {r for b in outer for r in b.removes}

        def running(path: str) -> bool:
            return not any(path == r or path.startswith(r + ".") for r in gone)

        sites = self.kept_sites
        if sites is not None:  # the ops of bypassed layers no longer run
            sites = tuple(site for site in sites if running(site.scope))
            blocks = {b.block for b in outer}  # whose own forward is regenerated: its lines
            if any(site.where[0] == "call" and site.scope in blocks for site in sites):
                sites = None  # are no longer the user's, so its calls cannot be found
        return dataclasses.replace(
            self, layers={k: v for k, v in self.layers.items() if running(k)},
            attributes={k: v for k, v in self.attributes.items() if running(k)}, bypasses=outer,
            kept_sites=sites)

    def removed_layers(self) -> list[str]:
        """The layers that no longer run (inside a bypassed body or gate)."""
        return sorted({r for b in self.bypasses for r in b.removes})

    def attribute_changes(self) -> list[tuple[str, int, int]]:
        """``("blocks.0.attn.num_heads", 3, 2)`` for every attribute the plan rewrites."""
        return [(f"{path}.{name}" if path else name, ap.size, len(ap.keep))
                for path, names in self.attributes.items() for name, ap in names.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "model_class": self.model_class,
            "fingerprint": self.fingerprint, "exact": self.exact, "settings": self.settings,
            "layers": {path: {"kind": lp.kind, "class": lp.cls,
                              "axes": {a: {"size": ap.size, "keep": list(ap.keep)}
                                       for a, ap in lp.axes.items()}}
                       for path, lp in self.layers.items()},
            "attributes": {path: {name: {"size": ap.size, "keep": list(ap.keep)}
                                  for name, ap in names.items()}
                           for path, names in self.attributes.items()},
            "bypass": [b.to_dict() for b in self.bypasses],
            "kept_sites": None if self.kept_sites is None else
            [site.to_dict() for site in self.kept_sites],
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        try:
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise PlanError(f"{source} is not a {FORMAT} v{VERSION} document "
                                f"(format={d.get('format')!r}, version={d.get('version')!r})")
            def axis(path: str, a: str, ap: Any) -> AxisPlan:
                keep = tuple(int(i) for i in ap["keep"])
                size = int(ap["size"])
                if (not keep or list(keep) != sorted(set(keep)) or keep[0] < 0
                        or keep[-1] >= size):
                    raise PlanError(f"{source}: layer '{path}' axis '{a}' keeps {len(keep)} "
                                    f"indices that are not sorted, unique and in [0, {size})")
                return AxisPlan(size, keep)

            layers = {str(path): LayerPlan(str(lp["kind"]), str(lp["class"]),
                                           {str(a): axis(path, a, ap)
                                            for a, ap in lp["axes"].items()})
                      for path, lp in d["layers"].items()}
            attributes = {str(path): {str(n): axis(path, n, ap) for n, ap in names.items()}
                          for path, names in d.get("attributes", {}).items()}
            bypasses = tuple(Bypass.from_dict(b) for b in d.get("bypass", []))
            sites = d.get("kept_sites")
            kept_sites = None if sites is None else tuple(KeptSite.from_dict(x) for x in sites)
            return cls(str(d["model_class"]), str(d["fingerprint"]), layers, bool(d["exact"]),
                       dict(d.get("settings", {})), attributes, bypasses, kept_sites)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"{source} is malformed ({type(e).__name__}: {e}); re-create it with "
                            "surgery.plan(...).save(path)") from e

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source} is not valid JSON: {e}") from e
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of one."""
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise PlanError(f"cannot read plan file {p}: {e.strerror}") from e
        return cls.from_json(text, source=str(p))

    def then(self, later: Plan) -> Plan:
        """This plan followed by ``later`` (made on the model this plan produces), as one plan
        for the original architecture: kept = self.keep[later.keep] per layer and axis."""
        layers = {p: LayerPlan(lp.kind, lp.cls, dict(lp.axes)) for p, lp in self.layers.items()}
        for path, lp in later.layers.items():
            base = layers.setdefault(path, LayerPlan(lp.kind, lp.cls, {}))
            for axis, ap in lp.axes.items():
                first = base.axes.get(axis, AxisPlan(ap.size, tuple(range(ap.size))))
                if len(first.keep) != ap.size:
                    raise PlanError(f"cannot chain plans: layer '{path}' axis '{axis}' has "
                                    f"{len(first.keep)} channels after the first plan but the "
                                    f"second expects {ap.size}")
                base.axes[axis] = AxisPlan(first.size, tuple(first.keep[i] for i in ap.keep))
        attributes = {p: dict(names) for p, names in self.attributes.items()}
        for path, names in later.attributes.items():
            for name, ap in names.items():
                mine = attributes.setdefault(path, {})
                first = mine.get(name, AxisPlan(ap.size, tuple(range(ap.size))))
                mine[name] = AxisPlan(first.size, tuple(first.keep[i] for i in ap.keep))
        settings = {**self.settings, "then": later.settings}
        sites = _chained_sites(self, later)
        if sites is None and "shapes_only" in later.settings:  # why, where the total says it
            settings.setdefault("shapes_only", later.settings["shapes_only"])
        return Plan(self.model_class, self.fingerprint, layers, self.exact and later.exact,
                    settings, attributes, self.bypasses + later.bypasses, sites)

    def removed(self) -> int:
        """Number of channel positions removed over every layer and axis."""
        return sum(ap.size - len(ap.keep) for lp in self.layers.values() for ap in lp.axes.values())

    def __repr__(self) -> str:
        depth = f", {len(self.bypasses)} blocks bypassed" if self.bypasses else ""
        return (f"Plan({self.model_class}, {len(self.layers)} layers shrunk, "
                f"{self.removed()} positions removed{depth}, exact={self.exact})")


def _chained_sites(first: Plan, later: Plan) -> tuple[KeptSite, ...] | None:
    """The kept-channel sites of ``first`` followed by ``later``: at an op both narrow, the
    positions of the original that both keep; at an op one narrows, that one's (the other kept
    all it saw there). None (shapes only) where either plan is checked by shapes only, or a
    site of ``later`` does not fit what ``first`` left."""
    if not (first.checks_values and later.checks_values):
        return None
    if first.kept_sites is None and later.kept_sites is None:
        return None  # both exact: so is the total, which needs no sites
    out = {site.where: site for site in first.kept_sites or ()}
    for site in later.kept_sites or ():
        before = out.get(site.where)
        if before is None:
            out[site.where] = site
            continue
        if (before.dim, before.calls, len(before.keep)) != (site.dim, site.calls, site.size):
            return None
        out[site.where] = dataclasses.replace(
            before, keep=tuple(before.keep[i] for i in site.keep))
    return tuple(out.values())


def per_unit(graph: ChannelGraph, g: Group) -> int:
    """Positions of one unit in the group's first slot (a grouped conv's unit spans its group)."""
    first = graph.slot_roots(g.slots[0])
    return max(1, int(np.isin(first, g.units).sum()) // len(g.units))


def keep_count(n_free: int, n_fixed: int, per_unit: int, ratio: float, round_to: int) -> int:
    """Units a group of ``n_free`` free (and ``n_fixed`` pinned) units keeps at ``ratio``,
    rounded up so the channel count is a multiple of ``round_to``; at least one."""
    n_keep = n_free - math.floor(ratio * n_free + 1e-9)
    if round_to > 1:
        step = round_to // math.gcd(round_to, per_unit)
        total = math.ceil((n_keep + n_fixed) / step) * step
        n_keep = min(n_free, max(total - n_fixed, n_keep))
    return max(n_keep, 1 if n_fixed == 0 else 0)


@pauses_collector
def make_plan(model: nn.Module, example_inputs: Inputs, config: Uniform | None = None, *,
              ratio: float | None = None, criterion: str = "l2", round_to: int = 8,
              ignore: Sequence[str] = (), seed: int = 0, graph: ChannelGraph | None = None,
              exact: bool = False, kept_units: Mapping[str, int] | None = None) -> Plan:
    """Decide which channels every layer keeps: remove ``ratio`` of each group's free units.

    Takes a :class:`surgery.Uniform` config, or its settings as keywords:

    Args:
        ratio: fraction of prunable channels removed from every coupled group, in [0, 1).
        criterion: a registered criterion name (``l1``, ``l2``, ``bn_scale``, ``random``).
        round_to: keep channel counts multiples of this, rounding up. The default 8 helps
            vectorised CPU kernels (benchmarks/speedup.py: ONNX Runtime efficiency +0.02 to
            +0.06 on mobile nets, neutral elsewhere); 1 gives exact ``ratio`` counts.
        ignore: layer names or ``re:`` regexes to keep as they are (see :func:`surgery.trace`).
        graph: a graph from :func:`surgery.trace` of the same model, to skip tracing again.
        exact: leave whole the groups whose channels pass a cross-channel norm (a transformer's
            embedding width through LayerNorm, ConvNeXt's stages), so the plan stays exactly
            equivalent to the zeroed original; by default they are pruned and the plan is
            marked not exact.
        kept_units: free units to keep per group, by the key of its first slot
            (``"layer1.0.conv1:out"``), instead of the ratio's count (the last of several steps
            lands on the count the ratio gives the original model).

    Example:
        >>> p = surgery.plan(model, torch.randn(1, 3, 224, 224), ratio=0.5)
        >>> p.save("plan.json")
    """
    if config is None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
            raise ConfigError(f"ratio must be a number in [0, 1) but received {ratio!r}")
        config = Uniform(ratio=ratio, criterion=criterion, round_to=round_to,
                         ignore=tuple(ignore), seed=seed, exact=exact)
    elif not isinstance(config, Uniform):
        raise ConfigError(f"this planner takes a Uniform config, not {type(config).__name__}; "
                          "surgery.plan takes them all")
    ratio, criterion, round_to = config.ratio, config.criterion, config.round_to
    ignore, seed, exact = config.ignore, config.seed, config.exact
    scorer_factory = get_criterion(criterion)
    if graph is None:
        graph = trace(model, example_inputs, ignore=ignore)
    if ratio > 0 and not any(g.prunable for g in graph.groups):
        top = "; ".join(f"{reason} ({n} channels)" for reason, n in graph.pin_summary())
        raise NothingToPruneError(
            f"{graph.model_class} has no channels that can be removed: every coupled group is "
            f"kept, because of: {top or 'no layer with channels'}. See surgery.trace(model, "
            "x).explain(layer) for a layer, or register a rule for the ops named.")
    score = scorer_factory(model, graph, seed)
    notes: list[str] = []
    hard = sorted({w for ws in graph.pinned.values() for w in ws if "hard-coded" in w})
    if hard:
        notes.append("channels kept because the forward hard-codes their count: "
                     + "; ".join(hard))
    removed: list[np.ndarray] = []
    for g in graph.groups:
        r = ratio
        if config.overrides:
            found = override_for(config, sorted({graph.slots[k].path for k in g.slots}))
            r = r if found is None else found
        if not g.prunable or r == 0 or exact and graph.cross & set(g.units.tolist()):
            continue
        n_keep = keep_count(len(g.units), len(g.pinned), per_unit(graph, g), float(r), round_to)
        if kept_units is not None and g.slots[0] in kept_units:
            n_keep = max(1, min(len(g.units), kept_units[g.slots[0]]))
        if n_keep >= len(g.units):
            continue
        if n_keep == 1 and r * len(g.units) > len(g.units) - 1 + 1e-9:
            notes.append(_kept_one(graph, g, float(r)))
        order = np.argsort(score(g), kind="stable")
        removed.append(g.units[order[:len(g.units) - n_keep]])
    gone = unique_ints(np.concatenate(removed)) if removed else np.zeros(0, np.int64)
    settings: dict[str, Any] = {"ratio": ratio, "criterion": criterion, "round_to": round_to,
                                "ignore": list(ignore), "seed": seed, "config": config.to_dict()}
    if exact:
        settings["exact"] = True
    little = _removes_little(graph, len(gone), ratio)
    if little:
        notes.append(little)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    if notes:
        settings["warnings"] = notes
    return plan_removing(model, graph, gone, settings)


def _kept_one(graph: ChannelGraph, g: Group, ratio: float) -> str:
    """Say that a group keeps one unit (a head) where ``ratio`` would have removed them all."""
    sized = [key for key, atoms in graph.attrs.items()
             if np.isin(graph.roots[atoms], g.units).any()]
    what = (f"{', '.join(sized[:3])}" if sized else f"the group of {g.slots[0]}")
    unit = per_unit(graph, g)
    kind = f"units of {unit} channels" if unit > 1 else "channels"
    return (f"{what} keeps 1 of {len(g.units)} {kind}: ratio {ratio} would remove every one, "
            "and a layer keeps at least one")


def _removes_little(graph: ChannelGraph, n_gone: int, ratio: float) -> str:
    """A warning when the plan removes far less than ``ratio`` asked, naming what pinned it."""
    total = sum(len(g.units) + len(g.pinned) for g in graph.groups)
    if ratio <= 0 or total == 0 or n_gone >= 0.25 * ratio * total:
        return ""
    top = "; ".join(f"{reason} ({n} channels)" for reason, n in graph.pin_summary())
    return (f"this plan removes only {n_gone} of {total} channels ({n_gone / total:.1%}) where "
            f"ratio {ratio} asked for about {ratio:.0%}: most are kept because of: {top}. "
            "Register a rule for those ops, or see graph.explain(layer).")


def plan_removing(model: nn.Module, graph: ChannelGraph, gone: np.ndarray,
                  settings: dict[str, Any]) -> Plan:
    """The plan that removes the units (roots) ``gone`` of ``graph`` from every slot they touch."""
    layers: dict[str, LayerPlan] = {}
    removed = np.zeros(len(graph.roots), dtype=bool)  # by root: one lookup per atom
    removed[gone] = True
    submodule = Submodules(model)
    for slot in graph.slots.values():
        keep = np.flatnonzero(~removed[graph.roots[slot.atoms]])
        if len(keep) == slot.size:
            continue
        cls = type(submodule(slot.path)).__name__ if slot.kind == "module" else "Tensor"
        lp = layers.setdefault(slot.path, LayerPlan(slot.kind, cls, {}))
        lp.axes[slot.axis] = AxisPlan(slot.size, tuple(keep.tolist()))
    attributes: dict[str, dict[str, AxisPlan]] = {}
    for key, atoms in graph.attrs.items():
        keep = np.flatnonzero(~removed[graph.roots[atoms]])
        if len(keep) < len(atoms):
            path, _, name = key.rpartition(".")
            attributes.setdefault(path, {})[name] = AxisPlan(len(atoms), tuple(keep.tolist()))
    exact = not (set(gone.tolist()) & graph.cross)
    kept_sites = None
    hard = [graph.hard_cross[r] for r in gone.tolist() if r in graph.hard_cross]
    if hard:  # what verification cannot run on the kept channels: it compares shapes only
        settings = {**settings, "shapes_only": f"{hard[0]}, which the reference cannot run on "
                                               "the kept channels alone"}
    elif not exact:
        kept_sites = tuple(KeptSite(site.where, site.dim, len(site.roots),
                                    tuple(np.flatnonzero(~removed[site.roots]).tolist()),
                                    site.calls)
                           for site in graph.sites if removed[site.roots].any())
    settings = {**settings, "tracer": graph.tracer}
    if graph.notes:
        settings["trace_notes"] = list(graph.notes)
    return Plan(graph.model_class, graph.fingerprint, layers, exact, settings, attributes,
                kept_sites=kept_sites)


def check_coupling(plan: Plan, graph: ChannelGraph) -> None:
    """Refuse (`PlanError`) a plan whose kept indices disagree with ``graph``'s coupled channels
    (a conv keeps channels {0, 1, 2} while its BatchNorm keeps {0, 1, 3}, or the next layer's
    input keeps others) or that removes channels that must stay (the network input, the model
    output): a plan edited by hand, for instance."""
    where = {(s.path, s.axis): s for s in graph.slots.values()}
    parts: list[np.ndarray] = []
    for path, lp in plan.layers.items():
        for axis, ap in lp.axes.items():
            slot = where.get((path, axis))
            if slot is None or slot.size != ap.size:
                there = "no such channels" if slot is None else f"{slot.size} channels there"
                raise PlanError(f"the plan prunes layer '{path}' axis '{axis}' of {ap.size} "
                                f"channels but the traced model has {there}; make a new plan "
                                "with surgery.plan(model, x, ...)")
            mask = np.ones(slot.size, bool)
            mask[list(ap.keep)] = False
            parts.append(graph.roots[slot.atoms][mask])
    gone = unique_ints(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    fixed = [r for r in gone.tolist()
             if not all("in ignore=" in why for why in graph.pinned.get(r, ["in ignore="]))]
    if fixed:
        slots = [s.key for s in graph.slots.values()
                 if np.isin(graph.roots[s.atoms], fixed).any()]
        raise PlanError(f"the plan removes channels that must stay ({graph.pinned[fixed[0]][0]})"
                        f" from {', '.join(slots[:4])}; make a new plan with "
                        "surgery.plan(model, x, ...)")
    # every position of every slot (and sized attribute): its unit, and whether the plan keeps it
    names, roots, kept, owner = [], [], [], []
    for name, atoms, entry in (
            [(s.key, s.atoms, plan.layers[s.path].axes.get(s.axis) if s.path in plan.layers
              else None) for s in graph.slots.values()]
            + [(f"attribute {key}", atoms, plan.attributes.get(key.rpartition(".")[0], {})
                .get(key.rpartition(".")[2])) for key, atoms in graph.attrs.items()]):
        mask = np.ones(len(atoms), bool)
        if entry is not None:
            mask[:] = False
            mask[list(entry.keep)] = True
        names.append(name)
        roots.append(graph.roots[atoms])
        kept.append(mask)
        owner.append(np.full(len(atoms), len(names) - 1))
    r, k, w = np.concatenate(roots), np.concatenate(kept), np.concatenate(owner)
    torn = np.intersect1d(r[k], r[~k])
    if len(torn):
        first = r == torn[0]
        hits = [(i, p) for i in np.unique(w[first]).tolist()
                for p in np.flatnonzero(roots[i] == torn[0]).tolist()]
        out = [f"{names[i]}[{p}]" for i, p in hits if not kept[i][p]]
        keep = [f"{names[i]}[{p}]" for i, p in hits if kept[i][p]]
        raise PlanError(
            f"the plan is inconsistent with the model's coupled channels: it removes "
            f"{_some(out)} but keeps {_some(keep)}, which are the same channel (coupled layers "
            f"keep or remove it together; {len(torn)} channels disagree). The plan was edited or "
            "is not for this model: make a new one with surgery.plan(model, x, ...)")


def _some(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, and how many more."""
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")
