"""surgery.copies: deep_copy makes what copy.deepcopy makes (a new tree, its own tensors, the
same ties, attributes and hooks; a module with its own copy protocol goes through deepcopy);
the shallow copies have tables of their own and share the values."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from surgery.copies import SharedModule, deep_copy, own_tables, shallow_copy


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.also = [self.head]  # a module held outside _modules
        self.sizes = {"width": [4, 4]}
        self.register_buffer("steps", torch.zeros(2))
        self.emb.register_forward_hook(lambda *a: None)


class _OwnCopy(nn.Linear):
    copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _OwnCopy:
        type(self).copies += 1
        new = _OwnCopy(self.in_features, self.out_features)
        new.load_state_dict(self.state_dict())
        return new


def _assert_like_deepcopy(model: nn.Module) -> nn.Module:
    want, got = copy.deepcopy(model), deep_copy(model)
    assert [(k, type(m)) for k, m in got.named_modules()] == \
        [(k, type(m)) for k, m in want.named_modules()]
    originals = dict(model.named_modules())
    for path, m in got.named_modules():
        assert m is not originals[path]
        assert m.__dict__.keys() == dict(want.named_modules())[path].__dict__.keys()
    theirs = {k: t for k, t in model.state_dict(keep_vars=True).items()}
    for k, t in got.state_dict(keep_vars=True).items():
        assert torch.equal(t, theirs[k]) and t is not theirs[k] and type(t) is type(theirs[k])
        assert t.data_ptr() != theirs[k].data_ptr()
    return got


@pytest.mark.parametrize("name", ["mnasnet0_5", "googlenet", "vit_b_16"])
def test_zoo_models_copy_as_deepcopy_does(name: str) -> None:
    _assert_like_deepcopy(torchvision.models.get_model(name, weights=None))


def test_ties_attributes_hooks_and_own_copy_protocols_are_kept() -> None:
    model = _Tied()
    got = _assert_like_deepcopy(model)
    assert got.head.weight is got.emb.weight  # the tie
    assert got.also[0] is got.head  # the alias follows the copy
    assert got.sizes == model.sizes and got.sizes["width"] is not model.sizes["width"]
    assert len(got.emb._forward_hooks) == 1
    assert got.emb._forward_hooks is not model.emb._forward_hooks
    holder = nn.Sequential(_OwnCopy(3, 2), nn.ReLU())
    before = _OwnCopy.copies
    copied = deep_copy(holder)
    assert _OwnCopy.copies == before + 1 and isinstance(copied[0], _OwnCopy)
    # a memo entry is taken as it is (the surgeon passes the layers it rebuilds)
    kept = deep_copy(holder, memo={id(holder[1]): holder[1]})
    assert kept[1] is holder[1] and kept[0] is not holder[0]


@pytest.mark.parametrize("copier", [shallow_copy, own_tables])
def test_shallow_copies_own_their_tables_and_share_the_values(copier: Any) -> None:
    m = nn.Conv2d(3, 4, 3)
    m.register_forward_hook(lambda *a: None)
    new = copier(m)
    assert type(new) is nn.Conv2d and new.weight is m.weight and new.kernel_size == (3, 3)
    new.register_forward_hook(lambda *a: None)
    new.weight = nn.Parameter(torch.zeros(4, 3, 3, 3))
    assert len(m._forward_hooks) == 1 and len(new._forward_hooks) == 2
    assert m.weight.abs().sum() > 0 and m._parameters["weight"] is not new.weight


def test_own_tables_refuses_a_module_held_outside_its_children() -> None:
    with pytest.raises(SharedModule, match="also"):
        own_tables(_Tied())  # `also` lists the head outside _modules
    assert own_tables(nn.Sequential(nn.ReLU()))[0] is not None
