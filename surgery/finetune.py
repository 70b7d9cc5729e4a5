"""Recover accuracy after pruning: SGD/AdamW with a cosine schedule, optional distillation from
the unpruned model, BatchNorm recalibration, atomic per-epoch checkpoints and exact resume.

Distillation loss (Hinton et al.):
``(1 - a) * CE(s, y) + a * T^2 * KL(softmax(t/T) || softmax(s/T))``, with student logits s,
teacher logits t, temperature T and weight a (``distill``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .atomic import default_mode, replacing
from .data import DataError
from .errors import ConfigError
from .modes import switched_mode


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, nesterov) or "adamw"
    weight_decay: float = 5e-4
    batch_size: int = 64
    distill: float = 0.0  # weight of the distillation term; 0 = plain cross-entropy
    temperature: float = 4.0
    recalibrate_bn: bool = True  # re-estimate BatchNorm statistics before each evaluation
    seed: int = 0


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    train_acc: float
    val_acc: float | None
    lr: float

    def line(self, epochs: int) -> str:
        """One line for a person: ``epoch 3/10: loss 0.41, train acc 0.88, val acc 0.86``."""
        val = f"{self.val_acc:.4f}" if self.val_acc is not None else "-"
        return (f"epoch {self.epoch}/{epochs}: loss {self.loss:.4f}, train acc "
                f"{self.train_acc:.4f}, val acc {val}")


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (the model's mode is restored)."""
    dev = _device(model)
    correct = total = 0
    with switched_mode(model), torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch_size):
            correct += int((model(x.to(dev)).argmax(1).cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


def recalibrate_bn(model: nn.Module, data: Dataset, *, batches: int = 20,
                   batch_size: int = 64) -> None:
    """Re-estimate BatchNorm running statistics on ``data`` (cumulative average, no gradients).

    Pruning changes what each BatchNorm sees; its old statistics are then off.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        g = torch.Generator().manual_seed(0)
        dev = _device(model)
        with switched_mode(model, train=True), torch.no_grad():
            for i, (x, _) in enumerate(DataLoader(data, batch_size=batch_size, shuffle=True,
                                                  generator=g)):
                if i >= batches:
                    break
                model(x.to(dev))
    finally:
        for m, mom in momenta.items():
            m.momentum = mom


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (batches are moved there)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, refused with the fix when no such GPU is present."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError:
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' but received "
                          f"{device!r}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError(f"device {str(dev)!r} asked for but this machine has no CUDA GPU "
                              "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {str(dev)!r} asked for but this machine has {n} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N' but received {str(dev)!r}")
    return dev


def _check_labels(model: nn.Module, data: Dataset) -> None:
    if len(data) == 0:  # type: ignore[arg-type]
        raise DataError("the training data set is empty")
    x, y = next(iter(DataLoader(data, batch_size=min(8, len(data)))))  # type: ignore[arg-type]
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x.to(_device(model)))
    model.train(was)
    if out.ndim != 2 or int(y.max()) >= out.shape[1]:
        raise DataError(f"labels go up to {int(y.max())} but the model outputs "
                        f"{tuple(out.shape[1:])} scores per sample; build the model with "
                        "num_classes matching the data")


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw' but received {cfg.optimizer!r}")


def _save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: Any, epoch: int, history: list[EpochLog], cfg: FinetuneConfig) -> None:
    """Write model, optimizer and schedule state into a temp dir, then swap it in."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()  # dropout masks continue as if never stopped
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    meta = {"epoch": epoch, "config": asdict(cfg), "param_groups": sd["param_groups"],
            "scalars": scalars, "scheduler": sched.state_dict(),
            "history": [asdict(h) for h in history]}
    directory.parent.mkdir(parents=True, exist_ok=True)
    with replacing(directory) as tmp:
        default_mode(tmp, directory=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))


def _load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: Any) -> tuple[int, list[EpochLog]]:
    from safetensors.torch import load_file

    meta = json.loads((directory / "state.json").read_text())
    tensors = load_file(str(directory / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            idx, name = k[6:].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for k, v in meta["scalars"].items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["epoch"]), [EpochLog(**h) for h in meta["history"]]


def finetune(model: nn.Module, train: Dataset, val: Dataset | None = None, *,
             teacher: nn.Module | None = None, config: FinetuneConfig | None = None,
             checkpoint: str | os.PathLike[str] | None = None,
             on_epoch: Callable[[EpochLog], None] | None = None,
             on_batch: Callable[[int, int, float], None] | None = None,
             distributed: bool = False, device: str | torch.device | None = None
             ) -> list[EpochLog]:
    """Train ``model`` in place on ``train``; evaluate on ``val`` after each epoch.

    With ``checkpoint`` a directory, the state after every epoch is written atomically and a
    later call with the same directory resumes after the last finished epoch, giving the same
    result as an uninterrupted run. With ``distributed`` (inside an initialised
    ``torch.distributed`` process group, see :func:`launch`) each rank trains on its shard
    through DistributedDataParallel; rank 0 writes checkpoints and reports epochs.
    ``on_batch(step, steps, loss)`` is called on rank 0 after every batch (progress bars).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``) moves the model (and teacher) there first; by
    default they train where their parameters are.

    Example:
        >>> log = surgery.finetune(small, digits("train"), digits("val"), teacher=model,
        ...                        config=FinetuneConfig(epochs=10, distill=0.5))
    """
    cfg = config or FinetuneConfig()
    if device is not None:
        target = resolve_device(device)
        if distributed and target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU
        model.to(target)
    dev = _device(model)
    if teacher is not None:
        teacher.to(dev)
    _check_labels(model, train)
    opt = _optimizer(model, cfg)
    steps_per_epoch = -(-len(train) // cfg.batch_size)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    history: list[EpochLog] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and (ckpt / "state.json").is_file():
        start, history = _load_checkpoint(ckpt, model, opt, sched)
    if teacher is not None:
        teacher.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    net = (nn.parallel.DistributedDataParallel(
        model, device_ids=[dev.index] if dev.type == "cuda" else None) if distributed else model)
    for epoch in range(start, cfg.epochs):
        if distributed:
            sampler: DistributedSampler[Any] = DistributedSampler(train, world, rank,
                                                                 shuffle=True, seed=cfg.seed)
            sampler.set_epoch(epoch)
            loader = DataLoader(train, batch_size=max(1, cfg.batch_size // world),
                                sampler=sampler)
        else:
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=g)
        model.train()
        total_loss = correct = seen = 0.0
        for step, (x, y) in enumerate(loader, 1):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            out = net(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None and cfg.distill > 0:
                with torch.no_grad():
                    t = teacher(x)
                kd = F.kl_div(F.log_softmax(out / cfg.temperature, 1),
                              F.softmax(t / cfg.temperature, 1), reduction="batchmean")
                loss = (1 - cfg.distill) * loss + cfg.distill * cfg.temperature ** 2 * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(y)
            if on_batch is not None and rank == 0:
                on_batch(step, len(loader), float(loss.detach()))
            correct += float((out.argmax(1) == y).sum())
            seen += len(y)
        if cfg.recalibrate_bn:
            recalibrate_bn(model, train)
        log = EpochLog(epoch + 1, total_loss / seen, correct / seen,
                       evaluate(model, val) if val is not None else None,
                       float(sched.get_last_lr()[0]))
        history.append(log)
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, model, opt, sched, epoch + 1, history, cfg)
        if distributed:
            dist.barrier()
        if on_epoch is not None and rank == 0:
            on_epoch(log)
    return history


def max_processes(backend: str = "gloo") -> int:
    """How many ranks this machine takes: CPU cores for gloo, GPUs for nccl."""
    return torch.cuda.device_count() if backend == "nccl" else (os.cpu_count() or 1)


def check_nproc(nproc: int, backend: str = "gloo") -> None:
    """Refuse a process count the machine cannot run (cores for gloo, GPUs for nccl)."""
    limit = max_processes(backend)
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 but received {nproc}")
    if nproc > limit:
        what = "GPUs" if backend == "nccl" else "CPU cores"
        raise ConfigError(f"--nproc {nproc} is more than the {limit} {what} of this machine; "
                          f"use at most {limit}")


def launch(worker: Callable[..., None], nproc: int, *args: Any, backend: str = "gloo") -> None:
    """Run ``worker(*args)`` in ``nproc`` spawned processes joined into one process group:
    ``gloo`` for CPU data parallelism, ``nccl`` for one process per GPU (rank r on cuda:r)."""
    check_nproc(nproc, backend)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_entry, args=(nproc, port, backend, worker, args), nprocs=nproc, join=True)


def _entry(rank: int, world: int, port: int, backend: str, worker: Callable[..., None],
           args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(max(1, max_processes() // world))
    try:
        worker(*args)
    finally:
        dist.destroy_process_group()


def under_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` job (it sets these variables)."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_under_torchrun(worker: Callable[..., None], *args: Any, backend: str = "gloo") -> None:
    """Join the process group that ``torchrun`` set up (``env://``) and run ``worker(*args)``."""
    if backend == "nccl":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ConfigError(f"torchrun started local rank {local} but this machine has "
                              f"{torch.cuda.device_count()} GPU(s); lower --nproc-per-node")
        torch.cuda.set_device(local)
    else:  # share the cores among the ranks on this node
        torch.set_num_threads(max(1, max_processes() // int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                            "1"))))
    dist.init_process_group(backend, init_method="env://")
    try:
        worker(*args)
    finally:
        dist.destroy_process_group()


def finetune_on(model: nn.Module, data: str, *, size: int, config: FinetuneConfig,
                teacher: nn.Module | None = None, checkpoint: str | os.PathLike[str] | None = None,
                distributed: bool = False, device: str | torch.device | None = None,
                on_epoch: Callable[[EpochLog], None] | None = None,
                on_batch: Callable[[int, int, float], None] | None = None) -> list[EpochLog]:
    """:func:`finetune` on data named as the command line names it (``digits``, a CIFAR-10
    folder, an ImageFolder directory) at ``size`` pixels, seeded by ``config.seed``."""
    from .data import load as load_data

    train, val = load_data(data, size=size)
    torch.manual_seed(config.seed)
    return finetune(model, train, val, teacher=teacher, config=config, checkpoint=checkpoint,
                    on_epoch=on_epoch, on_batch=on_batch, distributed=distributed, device=device)


def finetune_saved(directory: str | os.PathLike[str], data: str, *, config: FinetuneConfig,
                   size: int | None = None, teacher: str | os.PathLike[str] | None = None,
                   checkpoint: str | os.PathLike[str] | None = None,
                   device: str | torch.device | None = None, trust_code: bool = False,
                   on_epoch: Callable[[EpochLog], None] | None = None,
                   on_batch: Callable[[int, int, float], None] | None = None,
                   rank_hashes: str | None = None) -> Path | None:
    """Fine-tune the model saved in ``directory`` (distilling from the saved ``teacher``
    directory when given) and save it back atomically; the directory's path on rank 0, None on
    the other ranks of a data-parallel run (``launch`` / torchrun call this once per rank).

    ``rank_hashes``: write each rank's final weight hash to ``PATH.rankN`` (for tests).
    """
    import hashlib

    from . import artifact
    from .plan import Plan

    net, meta = artifact.load_any(directory, trust_code=trust_code)
    teach = artifact.load_any(teacher, trust_code=trust_code)[0] if teacher else None
    finetune_on(net, data, size=size or int(meta["input_shape"][-1]),
                config=config if teach is not None else FinetuneConfig(
                    **{**asdict(config), "distill": 0.0}),
                teacher=teach, checkpoint=checkpoint, distributed=dist.is_initialized(),
                device=device, on_epoch=on_epoch, on_batch=on_batch)
    rank = dist.get_rank() if dist.is_initialized() else 0
    net.cpu()
    if rank_hashes:
        h = hashlib.sha256(b"".join(t.detach().numpy().tobytes()
                                    for t in net.state_dict().values()))
        world = dist.get_world_size() if dist.is_initialized() else 1
        Path(f"{rank_hashes}.rank{rank}").write_text(f"world={world} {h.hexdigest()}")
    if rank != 0:
        return None
    plan = Plan.load(Path(directory) / artifact.PLAN)
    return artifact.save(directory, net, plan, spec=meta["spec"],
                         model_args=meta.get("model_args"), input_shape=meta["input_shape"])


def data_parallel(worker: Callable[..., None], *args: Any, nproc: int = 1,
                  device: str | torch.device | None = "cpu") -> None:
    """Run ``worker(*args)`` once, in ``nproc`` data-parallel processes, or as this rank of a
    ``torchrun`` job: gloo on CPUs, NCCL with one GPU per rank when ``device`` is cuda."""
    target = resolve_device(device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    check_nproc(nproc, backend)
    if (nproc > 1 or under_torchrun()) and target.index is not None:
        raise ConfigError(f"--device {device} names one GPU, but each rank takes its own; pass "
                          "--device cuda")
    if under_torchrun():
        if nproc != 1:
            raise ConfigError("under torchrun, give the process count to torchrun "
                              "(--nproc-per-node) and leave --nproc at 1")
        run_under_torchrun(worker, *args, backend=backend)
    elif nproc == 1:
        worker(*args)
    else:
        launch(worker, nproc, *args, backend=backend)
