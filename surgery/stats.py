"""Size and cost of a model: parameters and multiply-accumulates (torch's own flop counter)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .graph import Inputs, as_tuple
from .modes import switched_mode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _counted(model: nn.Module, example_inputs: Inputs, per_module: bool) -> FlopCounterMode:
    """torch's flop counter after one eval-mode forward (modes and grad flags put back)."""
    # the counter's module tracker hooks the backward of inputs that require grad, and fails on
    # a parameter passed into a submodule as is (timm's PiT hands its class token on): count
    # with no parameter requiring grad
    grads = [(p, p.requires_grad) for p in model.parameters()]

    def fresh() -> FlopCounterMode:
        # torch annotates depth as int, but its table reads None as unlimited
        return FlopCounterMode(display=False, depth=None if per_module else 2,  # type: ignore[arg-type]
                               custom_mapping=_UNCOUNTED)

    inputs = as_tuple(example_inputs)
    large = sum(p.numel() for p, _ in grads) >= ON_SHAPES
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        # nn.MultiheadAttention's eval fast path (and TransformerEncoderLayer's) is one fused
        # kernel the counter does not know: it would count a whole attention layer as 0
        torch.backends.mha.set_fastpath_enabled(False)
        with switched_mode(model), torch.no_grad():
            counter = fresh()
            if not (large and _on_meta(model, inputs, counter)):
                counter = fresh()  # a failed meta run may have counted part of the forward
                with counter:
                    model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for p, flag in grads:
            p.requires_grad_(flag)
    return counter


#: from this many parameters on, MACs are counted on the meta device (shapes only, no
#: arithmetic): 3-4x faster on ViT-B/16 or RegNetY-16GF, the same count; below it the real
#: forward is the faster (a mobile net's many small ops cost more to dispatch on meta)
ON_SHAPES = 10_000_000


def _on_meta(model: nn.Module, inputs: tuple, counter: FlopCounterMode) -> bool:
    """Count one forward on the meta device, the model's tensors swapped for meta ones for the
    call. False where the forward needs values or mixes devices (``.item()``, a branch on a
    tensor, a plain tensor attribute): the caller then counts a real forward."""
    state = {name: torch.empty_like(t, device="meta") for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False)]}
    meta = torch.utils._pytree.tree_map(
        lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, inputs)
    try:
        with counter:
            torch.func.functional_call(model, state, tuple(meta), strict=False)
    except Exception:  # it needs real values: the caller counts a real forward
        return False
    return True


def _sdpa_on_cpu(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any,
                 **kwargs: Any) -> int:
    """FLOPs of the two attention products (q k^T and attention @ v), as torch counts them for
    its GPU attention kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _recurrent(input_shape: Any, hx: Any, params: Any, has_biases: bool, *args: Any,
               out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of a whole recurrent layer (``aten.gru`` and the like: torch counts none): per
    step, layer and direction, the gate rows of ``weight_ih`` and ``weight_hh`` times their
    widths."""
    steps = math.prod(input_shape[:-1])  # sequence length (x batch, in either order)
    return 2 * steps * sum(w[0] * w[1] for w in params if len(w) == 2)  # the 2-d ones: weights


def _rnn_layer(input_shape: Any, w_ih: Any, w_hh: Any, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """FLOPs of one LSTM layer and direction as oneDNN runs it on the CPU."""
    return 2 * math.prod(input_shape[:-1]) * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


#: kernels torch's flop counter does not count (PyTorch 2.14): scaled_dot_product_attention on
#: the CPU runs this one, so a ViT's attention products counted 0; recurrent layers
_UNCOUNTED = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_on_cpu,
              torch.ops.aten.lstm.input: _recurrent, torch.ops.aten.gru.input: _recurrent,
              torch.ops.aten.rnn_tanh.input: _recurrent, torch.ops.aten.rnn_relu.input: _recurrent,
              torch.ops.aten.mkldnn_rnn_layer: _rnn_layer}


def count_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """Multiply-accumulates of one eval-mode forward (FLOPs / 2, as counted by torch)."""
    return _counted(model, example_inputs, False).get_total_flops() // 2


def module_macs(model: nn.Module, example_inputs: Inputs) -> dict[str, int]:
    """MACs of every module (by qualified name) in one eval-mode forward."""
    counts = _counted(model, example_inputs, True).get_flop_counts()
    root = type(model).__name__ + "."
    return {k[len(root):]: sum(v.values()) // 2 for k, v in counts.items()
            if k.startswith(root)}
