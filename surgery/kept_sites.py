"""Cross-channel ops run on the kept channels alone: a plan through them is verified by value.

Removing a channel that a LayerNorm over C (or a mean over the channels) reads changes the result
for the channels that stay: the pruned model is not equal to the original with those channels
zeroed. It is equal to the original with each such op computed over the kept channels only, as the
pruned op computes it. The tracer records where each op runs (a *site*: a layer, or the n-th call
of a function from a source line) and the plan keeps, per site, which channels stay; the
verification reference then runs those ops through their rule's ``on_kept``.

A call site is found again in the reference's forward by its source line and how many calls of
the same function that line made before it; the file is named relative to the ``sys.path``
entry it lies under, so a plan saved in one environment is found again in another that has the
same source (another machine, virtualenv or container). The run is trusted only if every site
was met with the traced width and each line made as many such calls as the trace saw; otherwise
verification falls back to comparing shapes, as for an op that cannot run on the kept channels.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .graph import portable_source, user_frame
from .paths import Submodules
from .rules import function_rule, leaf_rule

#: ``("module", path)`` or ``("call", file, line, function name, scope, n)``: the n-th call of
#: that function from that line in the forward of layer ``scope`` (the file as
#: :func:`surgery.graph.portable_source` names it)
Where = tuple[Any, ...]


@dataclass(frozen=True)
class KeptSite:
    """One cross-channel op of a plan: where it runs, the dim of its first input that holds the
    channels, their number, the positions kept, and how many calls of that function its source
    line makes in one forward (of a layer: how many times it is called)."""

    where: Where
    dim: int
    size: int
    keep: tuple[int, ...]
    calls: int = 1

    @property
    def scope(self) -> str:
        """The layer that runs the op: the layer itself, or the one whose forward calls it."""
        return str(self.where[1] if self.where[0] == "module" else self.where[4])

    def to_dict(self) -> dict[str, Any]:
        return {"where": list(self.where), "dim": self.dim, "size": self.size,
                "keep": list(self.keep), "calls": self.calls}

    @classmethod
    def from_dict(cls, d: Any) -> KeptSite:
        where = tuple(d["where"])
        if where[0] not in ("module", "call") or len(where) != (2 if where[0] == "module" else 6):
            raise ValueError(f"a kept-channel site must be a module or a call, not {where!r}")
        return cls(where, int(d["dim"]), int(d["size"]), tuple(int(i) for i in d["keep"]),
                   int(d.get("calls", 1)))


class KeptRun:
    """Makes a reference model run its plan's cross-channel ops on the kept channels: a forward
    hook on each layer site, and (as a context manager) a torch function mode for the call
    sites. ``trusted()`` after the run: every site was met, once, at the traced width."""

    def __init__(self, ref: nn.Module, sites: tuple[KeptSite, ...]) -> None:
        self.met: dict[Where, int] = {}
        self.bad = ""
        self.sites = sites
        self.hooks = []
        submodule = Submodules(ref)
        for site in sites:
            if site.where[0] == "module":
                try:
                    m = submodule(site.where[1])
                except (KeyError, AttributeError):  # a plan edited by hand: not this model's
                    self.bad = self.bad or f"no layer {site.where[1]!r} in the model"
                    continue
                self.hooks.append(m.register_forward_hook(self._module_hook(site)))
        # a call site's file by its portable name (a plan saved before names were portable
        # holds absolute paths: the same file here is found by either)
        self.calls = {(portable_source(s.where[1]), *s.where[2:]): s
                      for s in sites if s.where[0] == "call"}
        self.paths = {id(m): path for path, m in ref.named_modules()} if self.calls else {}
        self.mode = _KeptCalls(self) if self.calls else None
        self.counts: dict[tuple[str, int, str, str], int] = {}  # calls per line, after the run

    def _met(self, site: KeptSite, x: Any) -> torch.Tensor | None:
        self.met[site.where] = self.met.get(site.where, 0) + 1
        if not isinstance(x, torch.Tensor) or x.ndim <= site.dim or \
                x.shape[site.dim] != site.size:
            self.bad = self.bad or f"{site.where} met with another input"
            return None
        return torch.tensor(site.keep, device=x.device)

    def _module_hook(self, site: KeptSite) -> Callable[..., Any]:
        def hook(m: nn.Module, args: tuple, out: Any) -> Any:
            keep = self._met(site, args[0] if args else None)
            rule = leaf_rule(m)
            try:
                y = rule.on_kept(m, args[0], site.dim, keep) if keep is not None and \
                    rule is not None else None
            except Exception:  # not a form it knows: shapes only, not a failure
                self.bad = self.bad or f"layer {site.where[1]} could not run on the kept channels"
                raise
            if y is None:
                self.bad = self.bad or f"layer {site.where[1]} cannot run on the kept channels"
                return None
            return y
        return hook

    def __enter__(self) -> KeptRun:
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)
            # the mode refers back to this run: dropped, the pair is freed without the cyclic
            # collector
            self.counts, self.mode = self.mode.counts, None
        for h in self.hooks:
            h.remove()

    def trusted(self) -> bool:
        """Every site met at its width as often as traced, and each call site's line made as
        many calls of its function as the trace saw."""
        if self.bad or any(self.met.get(s.where) != (s.calls if s.where[0] == "module" else 1)
                           for s in self.sites):
            return False
        return all(self.counts.get(key[:4]) == site.calls for key, site in self.calls.items())


class _KeptCalls(TorchFunctionMode):
    """Counts the calls of the sites' functions per source line and runs each site's call on
    the kept channels (through its function rule's ``on_kept``)."""

    def __init__(self, run: KeptRun) -> None:
        super().__init__()
        self.run = run
        self.names = {key[2] for key in run.calls}
        self.counts: dict[tuple[str, int, str, str], int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if isinstance(name, str) and name in self.names:
            frame = sys._getframe(1)
            loc = user_frame(frame)
            if loc is not None:
                key = (portable_source(loc[0]), loc[1], name, self._scope(frame))
                n = self.counts.get(key, 0)
                self.counts[key] = n + 1
                site = self.run.calls.get((*key, n))
                if site is not None:
                    x = args[0] if args else kwargs.get("input")
                    keep = self.run._met(site, x)
                    rule = function_rule(func) or function_rule(name)
                    if keep is not None and rule is not None and rule.on_kept is not None:
                        try:
                            return rule.on_kept(func, args, kwargs, site.dim, keep)
                        except Exception:  # not a form it knows: shapes only, not a failure
                            self.run.bad = self.run.bad or f"{name} at {key[0]}:{key[1]} " \
                                "could not run on the kept channels"
                            raise
                    self.run.bad = self.run.bad or f"call {site.where} not run on kept channels"
        return func(*args, **kwargs)

    def _scope(self, frame: Any) -> str:
        """The path of the innermost layer of the reference whose forward is running as a layer
        call (from nn.Module's ``__call__``), as the trace's scope is: a child's other method
        (``self.child.helper(x)``) runs in its caller's scope."""
        paths = self.run.paths
        while frame is not None:
            if "self" in frame.f_code.co_varnames and frame.f_back is not None and \
                    frame.f_back.f_code.co_filename == _MODULE_CALL:
                path = paths.get(id(frame.f_locals.get("self")))
                if path is not None:
                    return path
            frame = frame.f_back
        return ""


#: the file of nn.Module's call machinery (``_call_impl``), which runs a layer's forward
_MODULE_CALL = nn.Module._call_impl.__code__.co_filename

