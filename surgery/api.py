"""prune(): plan + apply + verify in one call."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .graph import Inputs
from .plan import make_plan
from .surgeon import apply
from .verify import verify as check


def prune(model: nn.Module, example_inputs: Inputs, *, ratio: float, criterion: str = "l2",
          round_to: int = 8, ignore: Sequence[str] = (), seed: int = 0,
          verify: bool = True) -> nn.Module:
    """A new, physically smaller model with ``ratio`` of every group's channels removed.

    The input model is never modified. With ``verify`` (default) the result is checked against
    the original with the removed channels zeroed and a :class:`VerificationError` is raised on
    any difference.

    Example:
        >>> small = surgery.prune(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224),
        ...                       ratio=0.5)
    """
    plan = make_plan(model, example_inputs, ratio=ratio, criterion=criterion, round_to=round_to,
                     ignore=ignore, seed=seed)
    small = apply(model, plan)
    if verify:
        check(model, small, plan, example_inputs)
    return small
