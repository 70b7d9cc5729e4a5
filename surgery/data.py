"""Datasets that need no download: scikit-learn's bundled digits, a local ImageFolder or CIFAR-10.

``digits`` is 1,797 real 8x8 handwritten digits shipped inside scikit-learn, upsampled to a
conv-friendly size and repeated to 3 channels, with a fixed stratified 80/20 train/validation split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import SurgeryError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


class DataError(SurgeryError, ValueError):
    """A data set that is missing, empty, unreadable or does not fit the model."""


def digits(split: str = "train", *, size: int = 32, channels: int = 3) -> TensorDataset:
    """The digits data as tensors ``(N, channels, size, size)``, normalised, and labels 0-9."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val' but received {split!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(range(len(y)), test_size=0.2, random_state=0,
                                          stratify=data.target)
    idx = torch.tensor(idx_train if split == "train" else idx_val)
    x = F.interpolate(x[idx], size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.3) / 0.4).repeat(1, channels, 1, 1)
    return TensorDataset(x.contiguous(), y[idx])


def image_folder(path: str | os.PathLike[str], *, size: int = 32) -> ImageFolder:
    """An ``ImageFolder`` (one sub-folder per class) resized to ``size``."""
    import torchvision
    from torchvision import transforms

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"data folder {root} has no class sub-folders (expected "
                        f"{root}/<class>/<image>)")
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.25] * 3)])
    try:
        ds = torchvision.datasets.ImageFolder(str(root), transform=tf,
                                              loader=lambda p: _rgb(p))
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read images under {root}: {e}") from e
    return ds


def _rgb(path: str) -> object:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL's own errors, or a plugin's that patched Image.open
        raise DataError(f"unreadable image {path}: {type(e).__name__}: {e}") from e


def cifar10(path: str | os.PathLike[str], split: str = "train") -> Dataset:
    """CIFAR-10 from a local folder (``download=False``: nothing is fetched)."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])])
    try:
        return torchvision.datasets.CIFAR10(str(path), train=split == "train", transform=tf,
                                            download=False)
    except RuntimeError as e:
        raise DataError(f"no CIFAR-10 data under {path} ({e}); place the extracted "
                        "cifar-10-batches-py folder there") from e


def num_classes(ds: Dataset) -> int:
    if isinstance(ds, TensorDataset):
        return int(ds.tensors[1].max()) + 1
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise DataError("cannot tell how many classes the data set has")
    return len(classes)


def load(spec: str, *, size: int = 32) -> tuple[Dataset, Dataset]:
    """Train and validation sets from a data spec: ``digits``, a CIFAR-10 folder, or an
    ImageFolder (split 80/20 with a fixed seed)."""
    if spec == "digits":
        return digits("train", size=size), digits("val", size=size)
    root = Path(spec)
    if (root / "cifar-10-batches-py").is_dir():
        return cifar10(root, "train"), cifar10(root, "test")
    ds = image_folder(root, size=size)
    if len(ds) < 2:
        raise DataError(f"data folder {root} has fewer than 2 images")
    n_val = max(1, len(ds) // 5)
    g = torch.Generator().manual_seed(0)
    train, val = torch.utils.data.random_split(ds, [len(ds) - n_val, n_val], generator=g)
    train.classes = val.classes = ds.classes  # type: ignore[attr-defined]
    return train, val


def samples(spec: str, n: int, *, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``n`` training images of a data spec (see :func:`load`) as one batch, drawn at random
    with a fixed ``seed`` (an ImageFolder lists its images class by class): real inputs to
    score a model's blocks on."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"the number of samples must be a positive int but received {n!r}")
    train, _ = load(spec, size=size)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train), generator=g)[:n].tolist()  # type: ignore[arg-type]
    return torch.stack([train[i][0] for i in idx])
