"""Real training on small data: loss goes down, accuracy above chance, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset, Subset

import surgery
from surgery.data import DataError, digits, image_folder, num_classes
from surgery.finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn
from surgery.spec import build_model


def test_digits_split_is_fixed_and_real() -> None:
    train, val = digits("train", size=16), digits("val", size=16)
    assert len(train) == 1437 and len(val) == 360 and num_classes(train) == 10
    assert train.tensors[0].shape[1:] == (3, 16, 16)
    assert torch.equal(digits("val", size=16).tensors[1], val.tensors[1])  # deterministic
    assert set(val.tensors[1].tolist()) == set(range(10))


def test_training_learns_digits() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    train, val = digits("train", size=16), digits("val", size=16)
    before = evaluate(model, val)
    calls: list[tuple[int, int, float]] = []
    log = finetune(model, train, val, config=FinetuneConfig(epochs=2, lr=0.05, batch_size=64),
                   on_batch=lambda step, steps, loss: calls.append((step, steps, loss)))
    assert log[1].loss < log[0].loss
    assert log[-1].val_acc > 0.5 > before + 0.2  # chance is 0.1
    steps = -(-len(train) // 64)  # progress callback: every batch of both epochs, in order
    assert [c[:2] for c in calls] == [(i, steps) for i in range(1, steps + 1)] * 2
    assert sum(c[2] for c in calls[:steps]) / steps > sum(c[2] for c in calls[steps:]) / steps


def test_pruned_model_recovers_with_distillation() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20")
    train, val = digits("train", size=16), digits("val", size=16)
    finetune(model, train, val, config=FinetuneConfig(epochs=2))
    small = surgery.prune(model, train.tensors[0][:1], ratio=0.5)
    recalibrate_bn(small, train)

    class Flipped(torch.nn.Module):  # the teacher's logits negated: it teaches the wrong class
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -self.m(x)

    def tuned(teacher: torch.nn.Module | None, distill: float, data: Dataset = train
              ) -> tuple[torch.nn.Module, float]:
        net = copy.deepcopy(small)
        log = finetune(net, data, val, teacher=teacher,
                       config=FinetuneConfig(epochs=1, lr=0.01, distill=distill, seed=0))
        assert torch.isfinite(torch.tensor(log[-1].loss))
        return net, log[-1].val_acc

    taught, acc = tuned(model, 0.5)
    assert acc > 0.5  # recovers
    # a teacher that teaches the wrong class changes the result, for the worse
    misled, misled_acc = tuned(Flipped(model), 0.5)
    assert not _same(misled, taught) and misled_acc < acc
    # on the same seed, distill=0 ignores the teacher; distill=0.5 does not
    few = Subset(train, range(128))
    plain = tuned(None, 0.0, few)[0]
    assert _same(tuned(model, 0.0, few)[0], plain) and not _same(tuned(model, 0.5, few)[0], plain)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


def test_resume_after_interruption_is_exact(tmp_path) -> None:
    train = Subset(digits("train", size=8), range(192))
    cfg = FinetuneConfig(epochs=3, batch_size=32, lr=0.02)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(1)
        return build_model("resnet20")

    straight = fresh()
    finetune(straight, train, config=cfg)

    class Killed(Exception):
        pass

    def kill_after_two(log) -> None:  # type: ignore[no-untyped-def]
        if log.epoch == 2:
            raise Killed

    resumed = fresh()
    with pytest.raises(Killed):
        finetune(resumed, train, config=cfg, checkpoint=tmp_path / "ckpt", on_epoch=kill_after_two)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp debris
    again = fresh()  # a new process would start from scratch: only the checkpoint carries over
    log = finetune(again, train, config=cfg, checkpoint=tmp_path / "ckpt")
    assert [entry.epoch for entry in log] == [1, 2, 3]
    for (k, a), b in zip(straight.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_labels_must_fit_the_model() -> None:
    model = build_model("resnet20", {"num_classes": 5})
    with pytest.raises(DataError, match="labels go up to 9 but the model outputs \\(5,\\)"):
        finetune(model, digits("train", size=8), config=FinetuneConfig(epochs=1))


def test_image_folder_loading_and_errors(tmp_path) -> None:
    from PIL import Image

    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        image_folder(tmp_path / "empty")
    for cls in ("cat", "dog"):
        (tmp_path / "ok" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 12), (i * 40, 10, 200)).save(tmp_path / "ok" / cls / f"{i}.png")
    ds = image_folder(tmp_path / "ok", size=16)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1 and num_classes(ds) == 2
    (tmp_path / "ok" / "dog" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable image .*bad.png"):
        [ds2 for ds2 in image_folder(tmp_path / "ok", size=16)]  # noqa: C416


def _tiny_cifar(root, n: int = 4) -> None:
    """A CIFAR-10 folder in the real python-pickle layout, with n images per batch."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 "labels": [(k + i) % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": [f"class{i}" for i in range(10)]}))


def test_local_cifar10_folder(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from surgery.data import load

    _tiny_cifar(tmp_path)
    with pytest.raises(DataError, match="place the extracted cifar-10-batches-py"):
        load(str(tmp_path))  # the checksums of the real files do not match: refused
    # with the checksum check off, our loader reads the real layout (no download, ever)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    train, val = load(str(tmp_path))
    assert len(train) == 20 and len(val) == 4 and num_classes(train) == 10
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
