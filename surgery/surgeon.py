"""The surgeon: applies a plan by rebuilding smaller leaf modules and swapping them in.

Precondition: the plan was made for this architecture (fingerprint) and every layer, axis and
size it names exists. All new modules and tensors are built before anything is swapped, so a
failure leaves the target untouched; ``apply`` works on a deep copy and never touches the input.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .collector import pauses_collector
from .copies import deep_copy
from .depth import bypass_in_place, bypassed_modules
from .errors import PlanError, SurgeryError
from .graph import Inputs, fingerprint, trace
from .groups import param_dim
from .paths import Submodules
from .plan import Plan, check_coupling
from .rules import module_rule, set_tensor


def _tensor(submodule: Submodules, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    t = getattr(submodule(owner), name, None)
    if not isinstance(t, torch.Tensor):
        raise AttributeError(name)
    return t


def _validate(model: nn.Module, plan: Plan, submodule: Submodules) -> None:
    fp = fingerprint(model)
    if fp != plan.fingerprint:
        raise PlanError(f"the plan was made for another architecture ({plan.model_class}, "
                        f"fingerprint {plan.fingerprint}) but the model is "
                        f"{type(model).__name__} with fingerprint {fp}; make a plan for this "
                        "model with surgery.plan(model, example_inputs, ratio=...)")
    gone = plan.removed_layers()
    for path in [*plan.layers, *plan.attributes]:
        inside = next((r for r in gone if path == r or path.startswith(r + ".")), None)
        if inside is not None:
            raise PlanError(f"the plan shrinks '{path}', but its bypasses remove '{inside}' "
                            "(it no longer runs); re-create the plan")
    for path, lp in plan.layers.items():
        try:
            target = submodule(path) if lp.kind == "module" else _tensor(submodule, path)
        except AttributeError:
            raise PlanError(
                f"the plan names layer '{path}' which this model does not have") from None
        for axis, ap in lp.axes.items():
            if isinstance(target, nn.Module):  # lp.kind == "module"; else a tensor
                rule = module_rule(target)
                if rule is None or axis not in rule.axes:
                    raise PlanError(f"layer '{path}' ({type(target).__name__}) has no prunable "
                                    f"axis '{axis}'")
            elif target.ndim <= param_dim(axis) or target.shape[param_dim(axis)] != ap.size:
                raise PlanError(f"tensor '{path}' has no dim {axis} of {ap.size} entries ("
                                f"shape {tuple(target.shape)}); the plan expects it on dim "
                                f"{axis}, the plan expects {ap.size}")


    for path, names in plan.attributes.items():
        for name, ap in names.items():
            attr, index = _attribute(name)
            try:
                value = getattr(model.get_submodule(path), attr)
                value = value if index is None else value[index]
            except (AttributeError, TypeError, IndexError):
                raise PlanError(f"the plan rewrites attribute '{path}.{name}', which this model "
                                "does not have") from None
            if isinstance(value, bool) or not isinstance(value, int) or value != ap.size:
                raise PlanError(f"the plan rewrites attribute '{path}.{name}' from {ap.size}, "
                                f"but the model has {value!r}")


Built = tuple[dict[int, nn.Module], list[tuple[str, torch.Tensor]]]


def _build(model: nn.Module, plan: Plan) -> Built:
    modules: dict[int, nn.Module] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    submodule = Submodules(model)
    for path, lp in plan.layers.items():
        try:
            if lp.kind == "module":
                old = submodule(path)
                keep = {a: ap.kept() for a, ap in lp.axes.items()}
                rule = module_rule(old)
                # _validate found a rule for every axis the plan prunes
                assert rule is not None, f"no module rule for {type(old).__name__}"
                modules[id(old)] = rule.shrink(old, keep)
            else:
                t = _tensor(submodule, path)
                for axis, ap in lp.axes.items():
                    t = t.detach().index_select(param_dim(axis),
                                                ap.kept().to(t.device))
                tensors.append((path, t))
        except SurgeryError:
            raise
        except Exception as e:
            raise PlanError(f"cannot shrink layer '{path}' ({lp.cls}): {e}") from e
    return modules, tensors


def _swap(model: nn.Module, modules: dict[int, nn.Module],
          tensors: list[tuple[str, torch.Tensor]]) -> None:
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in modules:
                parent._modules[name] = modules[id(child)]
    for path, t in tensors:
        owner, _, name = path.rpartition(".")
        set_tensor(model.get_submodule(owner), name, t)


def _attribute(name: str) -> tuple[str, int | None]:
    """``"bias_shape[2]"`` -> ("bias_shape", 2); ``"num_heads"`` -> ("num_heads", None)."""
    if name.endswith("]") and "[" in name:
        attr, _, index = name[:-1].partition("[")
        return attr, int(index)
    return name, None


def _set_attributes(model: nn.Module, plan: Plan) -> None:
    """Sizes the forward reads from attributes (``num_heads``, a split's ``c``, an entry of
    ``self.shape``) follow the plan."""
    for path, names in plan.attributes.items():
        module = model.get_submodule(path)
        for name, ap in names.items():
            attr, index = _attribute(name)
            if index is None:
                setattr(module, attr, len(ap.keep))
            else:
                entries = list(getattr(module, attr))
                entries[index] = len(ap.keep)
                setattr(module, attr, type(getattr(module, attr))(entries))


@pauses_collector
def apply(model: nn.Module, plan: Plan, example_inputs: Inputs | None = None) -> nn.Module:
    """A new, physically smaller model; ``model`` itself is left bit-for-bit unchanged.

    With ``example_inputs``, a plan from elsewhere (a file) is first checked against the model's
    traced channel groups: coupled layers must keep the same channels (`PlanError` otherwise).

    Example:
        >>> small = surgery.apply(model, surgery.Plan.load("plan.json"), x)
    """
    submodule = Submodules(model)
    _validate(model, plan, submodule)
    if example_inputs is not None and (plan.layers or plan.attributes):
        # the channels couple as they do once the plan's bypasses are made
        traced = bypass_in_place(copy.deepcopy(model), plan.bypasses) if plan.bypasses else model
        check_coupling(plan, trace(traced, example_inputs,
                                   ignore=plan.settings.get("ignore") or ()))
    # Layers the plan rebuilds are not worth copying: they are replaced by new modules built from
    # the originals (read only). Everything else is deep-copied.
    rebuilt = {id(m): m for path, lp in plan.layers.items() if lp.kind == "module"
               for m in (submodule(path),)}
    target = deep_copy(model, memo=dict(rebuilt))
    bypassed = bypassed_modules(target, plan.bypasses)
    modules, tensors = _build(target, plan)
    _swap_bypassed(target, bypassed)
    _swap(target, modules, tensors)
    if any(id(m) in rebuilt for m in target.modules()):  # referenced from outside _modules
        target = copy.deepcopy(model)
        bypassed = bypassed_modules(target, plan.bypasses)
        built = _build(target, plan)
        _swap_bypassed(target, bypassed)
        _swap(target, *built)
    _set_attributes(target, plan)
    return target


def _swap_bypassed(model: nn.Module, bypassed: dict[str, nn.Module]) -> None:
    for path, new in bypassed.items():
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).register_module(name, new)


@pauses_collector
def apply_(model: nn.Module, plan: Plan) -> nn.Module:
    """In place: swap the smaller layers into ``model`` itself (atomic: all built first)."""
    submodule = Submodules(model)
    _validate(model, plan, submodule)
    bypassed = bypassed_modules(model, plan.bypasses)
    built = _build(model, plan)
    _swap_bypassed(model, bypassed)
    _swap(model, *built)
    _set_attributes(model, plan)
    return model
