"""Recurrent layers (a CRNN's LSTM/GRU after a conv trunk, timm's Sequencer): input features and
hidden units go, exactly; the pruned layer still trains."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import surgery


class _CRNN(nn.Module):
    def __init__(self, cls: type[nn.RNNBase], layers: int, bidirectional: bool,
                 **kw: object) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.rnn = cls(16 * 4, 24, num_layers=layers, bidirectional=bidirectional,
                       batch_first=True, **kw)
        self.fc = nn.Linear(24 * (2 if bidirectional else 1), 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        b, _, _, w = f.shape
        y, _ = self.rnn(f.permute(0, 3, 1, 2).reshape(b, w, -1))
        return self.fc(y)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
def test_recurrent_layers_lose_inputs_and_hidden_units_exactly(cls, layers, bidirectional) -> None:
    torch.manual_seed(0)
    model = _CRNN(cls, layers, bidirectional).eval()
    x = torch.randn(2, 1, 4, 12)
    before = snapshot(model)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    report = surgery.verify(model, small, plan, x)
    assert_unchanged(model, before)
    assert plan.exact and report.passed and report.exact_checked
    rnn = small.rnn
    assert type(rnn) is cls and rnn.hidden_size == 12 and rnn.input_size == 8 * 4
    assert small.conv[0].out_channels == 8 and small.fc.in_features == 12 * (1 + bidirectional)
    # the flat weight list the kernels read is the pruned tensors
    assert all(a is b for a, b in zip(rnn._flat_weights, [getattr(rnn, n) for n in
                                                           rnn._flat_weights_names],
                                      strict=True))
    small.train()
    small(x).sum().backward()
    assert rnn.weight_hh_l0.grad is not None
    with torch.no_grad():  # a wrong recurrent weight is caught
        rnn.weight_hh_l0[0, 0] += 0.5
    with pytest.raises(surgery.VerificationError, match="differ"):
        surgery.verify(model, small, plan, x)


def test_a_projection_or_a_given_state_keeps_the_layer() -> None:
    torch.manual_seed(0)
    model = _CRNN(nn.LSTM, 1, False, proj_size=0).eval()
    x = torch.randn(2, 1, 4, 12)
    proj = _CRNN(nn.LSTM, 1, False)
    proj.rnn = nn.LSTM(64, 24, batch_first=True, proj_size=12)
    proj.fc = nn.Linear(12, 7)
    graph = surgery.trace(proj.eval(), x)
    assert "rnn:hidden" not in {k for g in graph.groups if g.prunable for k in g.slots}
    assert any("proj_size" in why for why, _ in graph.pin_summary(5))
    assert "rnn" in surgery.plan(model, x, ratio=0.5, round_to=1).layers


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_macs_are_counted(cls, gates) -> None:
    """torch's flop counter counts no recurrent kernel: per step, layer and direction, the gate
    rows times the input and hidden widths (layer 2 reads both directions of layer 1)."""
    rnn = cls(10, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 10)
    steps = 3 * 5
    per_direction = gates * 6 * (10 + 6) + gates * 6 * (12 + 6)
    assert surgery.count_macs(rnn, x) == steps * 2 * per_direction


class _Flattened(nn.Module):
    """A CRNN's ``view(b, w, c * h)``: a size computed from the channel count and the height."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.rnn = nn.GRU(16 * 4, 8, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        b, c, h, w = f.shape
        y, _ = self.rnn(f.permute(0, 3, 1, 2).reshape(b, w, c * h))
        return self.fc(y)


def test_a_size_computed_from_the_channel_count_follows_it() -> None:
    torch.manual_seed(0)
    model = _Flattened().eval()
    x = torch.randn(2, 1, 4, 12)
    plan = surgery.plan(model, x, ratio=0.5, round_to=1)
    small = surgery.apply(model, plan)
    assert surgery.verify(model, small, plan, x).exact_checked
    assert small.conv.out_channels == 8 and small.rnn.input_size == 8 * 4


def test_recurrent_macs_with_a_projection_and_without_a_batch() -> None:
    lstm = nn.LSTM(10, 6, num_layers=2, proj_size=4)  # layer 2 reads the 4 projected features
    x = torch.randn(5, 10)  # unbatched: 5 steps
    per_step = 4 * 6 * (10 + 4) + 6 * 4 + 4 * 6 * (4 + 4) + 6 * 4
    assert surgery.count_macs(lstm, x) == 5 * per_step
