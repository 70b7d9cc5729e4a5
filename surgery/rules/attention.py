"""nn.MultiheadAttention: pruned by whole heads, and by input and output width.

Math. With embed width E, H heads of width D (E = H·D inside), ``in_proj_weight`` is
``[Wq; Wk; Wv]`` of shape (3E, E_in) and ``out_proj`` maps E → E_out. Removing head h drops rows
h·D … h·D+D-1 of each of Wq, Wk, Wv and the same columns of ``out_proj``: the other heads'
scores and outputs are unchanged, so the result equals the original with those out_proj columns
zeroed. The scale stays 1/sqrt(D) since D is kept.

``F.multi_head_attention_forward`` requires the inner width to equal the query width, so a
pruned layer becomes a :class:`PrunedMultiheadAttention`: a subclass (``isinstance`` still holds,
attributes and parameter names are the same) whose forward computes the same attention with an
inner width of its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PlanError
from ..groups import TVal
from . import ModuleRule, clone_module, register_module_rule, set_tensor, take_rows_cols
from .context import RuleContext


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` after surgery: ``num_heads`` heads of ``head_dim`` inside,
    ``embed_dim`` wide at the input and ``out_proj.out_features`` wide at the output."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first:  # work as (batch, tokens, width)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        inner = self.num_heads * self.head_dim
        wq, wk, wv = self.in_proj_weight.split(inner)
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(inner)
        n, lq, lk = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, wq, bq).view(n, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = F.linear(key, wk, bk).view(n, lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = F.linear(value, wv, bv).view(n, lk, self.num_heads, self.head_dim).transpose(1, 2)
        mask = _merged_mask(attn_mask, key_padding_mask, q.dtype, n, self.num_heads)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + torch.full((lq, lk), float("-inf"), dtype=q.dtype,
                                             device=q.device).triu(1)
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, inner))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(1)), weights


def _merged_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 dtype: torch.dtype, n: int, heads: int) -> torch.Tensor | None:
    """MultiheadAttention's masks (True or -inf: masked) as one additive float mask."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(n, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    return mask


class MultiheadAttentionRule(ModuleRule[nn.MultiheadAttention]):
    """Axes: ``in`` (the query/key/value width read by ``in_proj``), ``heads`` (the inner width,
    one unit per head) and ``out`` (``out_proj``'s output)."""

    types = (nn.MultiheadAttention, PrunedMultiheadAttention)
    axes = ("in", "heads", "out")
    compared_outputs = 1  # the weights averaged over heads differ once heads go

    def propagate(self, ctx: RuleContext, path: str, m: nn.MultiheadAttention, inputs: list[Any],
                  out: Any) -> Any:
        q = inputs[0] if inputs else None
        supported = (m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
                     and isinstance(q, TVal) and len(inputs) >= 3)
        if not supported:
            return ctx.opaque(inputs, out, f"MultiheadAttention '{path}' with separate key/value "
                                           "widths, bias_k or add_zero_attn")
        assert isinstance(q, TVal)  # part of ``supported``
        last = q.ndim - 1
        a_in = ctx.slot(path, "in", ctx.channels_in(q, last, m.embed_dim))
        for kv in inputs[1:3]:
            if kv is not q:
                ctx.uf.union_arrays(a_in, ctx.channels_in(kv, kv.ndim - 1, m.embed_dim))
        heads = ctx.out_atoms(path, "heads", m.num_heads * m.head_dim)
        for j in range(1, m.head_dim):  # a head goes as a whole: its width (and scale) stays
            ctx.uf.union_arrays(heads.reshape(m.num_heads, m.head_dim)[:, 0],
                                heads.reshape(m.num_heads, m.head_dim)[:, j])
        mask = inputs[5] if len(inputs) > 5 else None  # forward's attn_mask
        if isinstance(mask, TVal) and len(mask.shape) == 3:  # [batch * num_heads, L, S]
            ctx.pin(heads, f"'{path}' is given one attention mask per head (attn_mask of shape "
                           f"{tuple(mask.shape)}) {ctx.where()}")
        weights = isinstance(out, tuple | list) and len(out) > 1 and out[1] is not None
        if weights and ctx.output_used(1):
            ctx.pin(heads, f"the attention weights of '{path}', averaged over its heads, are used "
                           f"{ctx.where()}")
        a_out = ctx.out_atoms(path, "out", m.out_proj.out_features)
        result = out[0] if isinstance(out, tuple | list) else out
        first = TVal(result.shape, (result.ndim - 1,), a_out)
        return (first, *out[1:]) if isinstance(out, tuple | list) else first

    def shrink(self, m: nn.MultiheadAttention, keep: dict[str, torch.Tensor]) -> nn.Module:
        e = m.num_heads * m.head_dim
        kin = keep.get("in", torch.arange(m.embed_dim))
        kh = keep.get("heads", torch.arange(e))
        kout = keep.get("out", torch.arange(m.out_proj.out_features))
        heads = torch.unique(kh // m.head_dim)
        if len(kh) != len(heads) * m.head_dim:
            raise PlanError(f"MultiheadAttention keeps {len(kh)} inner positions, not whole heads "
                            f"of {m.head_dim}; re-make the plan with surgery.plan")
        rows = torch.cat([kh, kh + e, kh + 2 * e])
        new = clone_module(m)
        new.__class__ = PrunedMultiheadAttention
        set_tensor(new, "in_proj_weight", take_rows_cols(m.in_proj_weight.detach(), rows, kin))
        if m.in_proj_bias is not None:
            set_tensor(new, "in_proj_bias", m.in_proj_bias.detach()[rows])
        proj = clone_module(m.out_proj)
        set_tensor(proj, "weight", take_rows_cols(m.out_proj.weight.detach(), kout, kh))
        if m.out_proj.bias is not None:
            set_tensor(proj, "bias", m.out_proj.bias.detach()[kout])
        proj.in_features, proj.out_features = len(kh), len(kout)
        new._modules["out_proj"] = proj
        new.num_heads = len(heads)
        new.embed_dim = new.kdim = new.vdim = len(kin)
        return new

    def importance(self, m: nn.MultiheadAttention, axis: str) -> torch.Tensor:
        w = m.in_proj_weight.detach()
        if axis == "in":
            return w.t()
        if axis == "heads":
            e = m.num_heads * m.head_dim
            return torch.cat([w[:e], w[e:2 * e], w[2 * e:], m.out_proj.weight.detach().t()], 1)
        return m.out_proj.weight.detach()

    def zero_removed(self, m: nn.MultiheadAttention, axis: str, idx: torch.Tensor) -> None:
        if not len(idx):
            return
        with torch.no_grad():
            if axis == "in":
                m.in_proj_weight[:, idx] = 0
            elif axis == "heads":  # a removed head adds nothing to the output
                m.out_proj.weight[:, idx] = 0


register_module_rule(MultiheadAttentionRule())
