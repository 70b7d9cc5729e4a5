"""The `surgery` commands that train: train, finetune (data-parallel too), sparsify.

They register on the command group of :mod:`surgery.cli`; the work is the library's
(:func:`surgery.finetune.finetune_on`, :func:`surgery.finetune.finetune_saved`,
:func:`surgery.sparse.sparsify`).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

from . import cli as shell
from .console import Console

if TYPE_CHECKING:
    pass

shell.EXAMPLES.update({
    "train": "surgery train resnet20 --data digits --epochs 30 --out out/r20",
    "finetune": "surgery prune out/r20 --ratio 0.5 --input-shape 1,3,32,32 --out out/r20-half\n"
                "  surgery finetune out/r20-half --data digits --teacher out/r20 --epochs 10\n"
                "  surgery finetune out/r20-half --data digits --device cuda --nproc 4   "
                "# 4 GPUs, NCCL\n"
                "  torchrun --nproc-per-node 4 $(which surgery) finetune out/r20-half "
                "--data digits --device cuda",
    "sparsify": "surgery sparsify out/r20 --amount 0.8 --data digits --epochs 3 "
                "--out r20.sparse.safetensors\n"
                "  surgery sparsify torchvision:resnet18 --amount 0.5 --scope layer --out r18.st",
})


data_option = click.option("--data", required=True, metavar="digits|DIR",
                           help="digits (bundled with scikit-learn), a CIFAR-10 folder or an "
                                "ImageFolder directory.")
size_option = click.option("--size", type=int, default=None,
                           help="Image size (default: the saved input shape, else 32).")


def _train_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--lr", type=float, default=0.05, show_default=True),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd",
                     show_default=True),
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda",
                     help="Where to train; with --nproc N on cuda each rank takes one GPU "
                          "(NCCL).")]):
        f = opt(f)
    return f


def _finetune_rank(job: dict[str, Any]) -> None:
    """`surgery finetune`, or one rank of it (module level: --nproc pickles it)."""
    from .finetune import finetune_saved

    epochs = job["config"].epochs
    with Console().batches(epochs) as on_batch:
        saved = finetune_saved(**job, on_batch=on_batch,
                               on_epoch=lambda log: click.echo(log.line(epochs)))
    if saved is not None:
        click.echo(str(saved))


def _finetune_config(kw: dict[str, Any], distill: float = 0.0) -> Any:
    from .finetune import FinetuneConfig

    return FinetuneConfig(epochs=kw["epochs"], lr=kw["lr"], optimizer=kw["optimizer"],
                          batch_size=kw["batch_size"], seed=kw["seed"], distill=distill)


@shell.cli.command(help=shell.usage(
    "train", "Train MODEL from scratch on --data and save it to --out DIR (an artifact with an "
             "empty plan)."))
@click.argument("model")
@shell.model_arg
@data_option
@size_option
@click.option("--out", "out_dir", required=True)
@click.option("--checkpoint", default=None, help="Directory for per-epoch checkpoints (resume).")
@_train_options
def train(model: str, model_args: tuple[str, ...], data: str, size: int | None, out_dir: str,
          checkpoint: str | None, **kw: Any) -> None:
    from .artifact import save_trained

    if os.path.isdir(model):
        raise shell.UserError(f"{model} is a saved model; use `surgery finetune {model}` instead")
    net, meta = shell.load_model(model, model_args)
    shell.train_on(net, data, size or 32, _finetune_config(kw), checkpoint=checkpoint,
           device=kw["device"])
    click.echo(str(save_trained(out_dir, net, meta, data, size or 32)))


@shell.cli.command(help=shell.usage(
    "finetune", "Fine-tune a saved DIR on --data (optionally distilling from --teacher DIR) and "
                "save it back atomically."))
@click.argument("directory")
@shell.trust_code
@data_option
@size_option
@click.option("--teacher", default=None, help="A saved DIR (e.g. the unpruned trained model).")
@click.option("--distill", type=float, default=0.5, show_default=True,
              help="Weight of the distillation loss when --teacher is given.")
@click.option("--checkpoint", default=None, help="Directory for per-epoch checkpoints (resume).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes: CPU processes (gloo), or one per GPU with "
                   "--device cuda (NCCL). Under torchrun, leave it at 1.")
@click.option("--rank-hashes", default=None, hidden=True,
              help="Write each rank's final weight hash to PATH.rankN (for tests).")
@_train_options
def finetune_cmd(directory: str, data: str, size: int | None, teacher: str | None,
                 distill: float, checkpoint: str | None, nproc: int, rank_hashes: str | None,
                 **kw: Any) -> None:
    from .finetune import data_parallel

    if not os.path.isdir(directory):
        raise shell.UserError(f"{directory} is not a saved DIR; run `surgery prune ... --out "
                              "DIR` first")
    job = {"directory": directory, "data": data, "teacher": teacher, "checkpoint": checkpoint,
           "size": size, "config": _finetune_config(kw, distill if teacher else 0.0),
           "device": kw["device"], "rank_hashes": rank_hashes,
           "trust_code": click.get_current_context().obj.get("trust_code", False)}
    data_parallel(_finetune_rank, job, nproc=nproc, device=kw["device"])


@shell.cli.command(help=shell.usage(
    "sparsify", "Unstructured magnitude pruning (torch.nn.utils.prune), optional fine-tuning "
                "with the masks on, then a sparse weights file; reports the real file sizes and "
                "latencies."))
@click.argument("model")
@shell.model_arg
@shell.trust_code
@shell.input_shape
@click.option("--amount", type=float, required=True, help="Fraction of weights set to zero.")
@click.option("--scope", type=click.Choice(["global", "layer"]), default="global",
              show_default=True, help="Rank weights over all layers or within each layer.")
@click.option("--data", default=None, metavar="digits|DIR",
              help="Fine-tune on this data with the masks applied (needs --epochs).")
@click.option("--epochs", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--out", "out_path", required=True, help="The sparse .safetensors file to write.")
@click.option("--bench/--no-bench", "do_bench", default=True, show_default=True,
              help="Time the dense original against the zeroed model (torch and ort, batch 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def sparsify(model: str, model_args: tuple[str, ...], input_shape: str | None, amount: float,
             scope: str, data: str | None, epochs: int, lr: float, out_path: str,
             do_bench: bool, as_json: bool) -> None:
    from .finetune import FinetuneConfig
    from .sparse import sparsify as run
    from .sparse import sparsify_lines

    if epochs > 0 and data is None:
        raise shell.UserError("--epochs needs --data (the data to fine-tune on)")
    shell.check_output("--out", out_path)
    net, meta = shell.load_model(model, model_args)
    shape = shell.example_shape(meta, input_shape)
    config = FinetuneConfig(epochs=epochs, lr=lr, optimizer="sgd", batch_size=64, seed=0)
    doing = "sparsifying" + (", benchmarking dense vs zeroed" if do_bench else "")
    with shell.console().step(doing):
        report = run(net, amount, out_path, scope=scope, bench_shape=shape[1:] if do_bench
                     else None, train=(lambda m: shell.train_on(m, data, shape[-1], config))  # type: ignore[arg-type]
                     if epochs > 0 else None)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    for line in [] if as_json else sparsify_lines(report):
        shell.console().emit(line)


