"""Recurrent layers: ``nn.LSTM``, ``nn.GRU``, ``nn.RNN``.

Math. Per layer and direction, gate ``g`` of hidden unit ``j`` reads the input through row
``g*H + j`` of ``weight_ih`` and the previous hidden state through row ``g*H + j`` of
``weight_hh`` (plus those entries of the biases). Removing input feature ``i`` drops column ``i``
of layer 0's ``weight_ih``. Removing hidden unit ``j`` drops its gate rows everywhere, and the
columns that read it: column ``j`` of every ``weight_hh`` and, in layers after the first, column
``d*H + j`` of ``weight_ih`` for each direction ``d``. One ``hidden_size`` serves every layer and
direction, so unit ``j`` goes from all of them together; the output holds it once per direction.
The verification reference zeroes those reading columns: a removed unit then still runs but
nothing reads it, which is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..groups import TVal
from . import ModuleRule, clone_module, register_module_rule, set_tensor
from .context import RuleContext

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _gates(m: nn.RNNBase) -> int:
    return _GATES[m.mode]


def _suffixes(m: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if m.bidirectional else ("",)


def _rows(m: nn.RNNBase, keep: torch.Tensor) -> torch.Tensor:
    """The gate rows of hidden units ``keep``, gate by gate."""
    return torch.cat([g * m.hidden_size + keep for g in range(_gates(m))])


def _hidden_cols(m: nn.RNNBase, keep: torch.Tensor) -> torch.Tensor:
    """The columns of a later layer's ``weight_ih`` that read hidden units ``keep``."""
    return torch.cat([d * m.hidden_size + keep for d in range(len(_suffixes(m)))])


def _refresh(m: nn.RNNBase) -> None:
    """Point the flat weight list the kernels read at the layer's current tensors."""
    m._init_flat_weights()


class RecurrentRule(ModuleRule[nn.RNNBase]):
    types = (nn.LSTM, nn.GRU, nn.RNN)
    axes = ("in", "hidden")

    def propagate(self, ctx: RuleContext, path: str, m: nn.RNNBase, inputs: list[Any],
                  out: Any) -> Any:
        x = inputs[0]
        state = inputs[1] if len(inputs) > 1 else None
        if getattr(m, "proj_size", 0) or not isinstance(x, TVal) or state is not None or \
                not isinstance(out, tuple):
            why = "a projection (proj_size)" if getattr(m, "proj_size", 0) else \
                "a given initial state" if state is not None else "a packed sequence"
            return ctx.opaque(inputs, out, f"recurrent layer '{path}' with {why}")
        last = x.ndim - 1
        ctx.slot(path, "in", ctx.channels_in(x, last, m.input_size))
        hidden = ctx.out_atoms(path, "hidden", m.hidden_size)
        seq = out[0]
        result = TVal(seq.shape, (seq.ndim - 1,), np.tile(hidden, len(_suffixes(m))))
        states = out[1] if isinstance(out[1], tuple) else (out[1],)
        # h_n (and c_n): (layers * directions, batch, hidden), the units on the last dim
        held = tuple(TVal(s.shape, (s.ndim - 1,), hidden) if isinstance(s, TVal) else s
                     for s in states)
        return (result, held if isinstance(out[1], tuple) else held[0])

    def shrink(self, m: nn.RNNBase, keep: dict[str, torch.Tensor]) -> nn.Module:
        kin = keep.get("in", torch.arange(m.input_size))
        kh = keep.get("hidden", torch.arange(m.hidden_size))
        rows, cols = _rows(m, kh), _hidden_cols(m, kh)
        new = clone_module(m)
        for layer in range(m.num_layers):
            for sfx in _suffixes(m):
                ih = getattr(m, f"weight_ih_l{layer}{sfx}").detach()
                hh = getattr(m, f"weight_hh_l{layer}{sfx}").detach()
                reads = kin if layer == 0 else cols
                set_tensor(new, f"weight_ih_l{layer}{sfx}", ih[rows][:, reads])
                set_tensor(new, f"weight_hh_l{layer}{sfx}", hh[rows][:, kh])
                if m.bias:
                    for name in (f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"):
                        set_tensor(new, name, getattr(m, name).detach()[rows])
        new.input_size, new.hidden_size = len(kin), len(kh)
        _refresh(new)
        return new

    def weight_rows(self, m: nn.RNNBase, axis: str, weight: torch.Tensor | None = None
                    ) -> torch.Tensor:
        if axis == "in":  # what every direction of the first layer reads from each feature
            return torch.cat([getattr(m, f"weight_ih_l0{sfx}").detach().t()
                              for sfx in _suffixes(m)], 1)
        h, g = m.hidden_size, _gates(m)
        parts = [getattr(m, f"weight_{kind}_l{layer}{sfx}").detach().reshape(g, h, -1)
                 .transpose(0, 1).reshape(h, -1)
                 for layer in range(m.num_layers) for sfx in _suffixes(m) for kind in ("ih", "hh")]
        return torch.cat(parts, 1)

    def zero_removed(self, m: nn.RNNBase, axis: str, idx: torch.Tensor) -> None:
        if not len(idx):
            return
        with torch.no_grad():
            for layer in range(m.num_layers):
                for sfx in _suffixes(m):
                    if axis == "in" and layer == 0:
                        getattr(m, f"weight_ih_l0{sfx}")[:, idx] = 0
                    elif axis == "hidden":
                        getattr(m, f"weight_hh_l{layer}{sfx}")[:, idx] = 0
                        if layer > 0:
                            getattr(m, f"weight_ih_l{layer}{sfx}")[:, _hidden_cols(m, idx)] = 0
        _refresh(m)


register_module_rule(RecurrentRule())
