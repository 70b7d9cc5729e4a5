"""The `surgery` command line: a thin shell over the library.

Exit codes: 0 ok, 1 user error (one-line message; --debug for the traceback), 2 internal error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import SurgeryError
from .runtimes import runtime_names
from .spec import SpecError, parse_kwargs

if TYPE_CHECKING:  # torch is imported where a command needs it: `surgery --help` stays fast
    import torch
    from torch import nn

EXAMPLES = {
    "inspect": "surgery inspect torchvision:resnet18\n"
               "  surgery inspect models/my_net.py:build --model-arg width=32 --json",
    "prune": "surgery prune torchvision:resnet50 --ratio 0.5 --out out/r50\n"
             "  surgery prune resnet20 --ratio 0.3 --input-shape 1,3,32,32 --dry-run",
    "export": "surgery export out/r50 --onnx r50.onnx\n"
              "  surgery export torchvision:mobilenet_v2 --onnx mnv2.onnx",
    "bench": "surgery bench out/r50 --runtime torch,ort --batch 1,8\n"
             "  surgery bench torchvision:resnet18 model.onnx --runtime ort --json out.json",
    "apply": "surgery apply torchvision:resnet50 out/r50/plan.json --out out/r50-again\n"
             "  surgery apply my_net.py:build plan.json --model-arg width=32 --out out/mine",
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
}


def _help(cmd: str, text: str) -> str:
    """The command's help with its examples kept one per line (click's \\b: no rewrapping)."""
    return f"{text}\n\nExamples:\n\n\b\n  {EXAMPLES[cmd]}"


class UserError(SurgeryError, ValueError):
    """A bad command-line argument."""


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    from .spec import build_model as build

    return build(spec, kwargs)


def _torch() -> Any:
    import torch

    return torch


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--input-shape {text!r} is not a comma-separated list of ints") from None
    if not shape or any(s <= 0 for s in shape):
        raise UserError(f"--input-shape {text!r} must be positive sizes")
    return shape


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of ints") from None
    if any(v <= 0 for v in values):
        raise UserError(f"{what} {text!r} must be positive")
    return values


@contextlib.contextmanager
def _step(ctx: click.Context, text: str) -> Iterator[None]:
    """A spinner on stderr for anything that may take more than a moment (off when quiet)."""
    if ctx.obj.get("quiet") or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


def _trusted() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.obj and ctx.obj.get("trust_code"))


def _load(spec: str, model_args: Sequence[str], trust_code: bool | None = None
          ) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a spec or a saved directory, and what is recorded about it."""
    from . import artifact
    if os.path.isdir(spec):
        meta = artifact.read_meta(spec)
        trust = _trusted() if trust_code is None else trust_code
        return artifact.load(spec, trust_code=trust), meta
    if spec.endswith(".onnx"):
        raise UserError(f"{spec} is an ONNX file; only `surgery bench` takes ONNX files")
    kwargs = parse_kwargs(model_args)
    return build_model(spec, kwargs), {"spec": spec, "model_args": kwargs}


def _check_output(flag: str, path: str | None) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {path}: folder {p.parent} does not exist; create it first")
    if not os.access(p.parent, os.W_OK):
        raise UserError(f"{flag} {path}: folder {p.parent} is not writable")


def _default_shape(meta: dict[str, Any], given: str | None) -> tuple[int, ...]:
    if given:
        return _shape(given)
    return tuple(meta.get("input_shape") or (1, 3, 224, 224))


def _emit(ctx: click.Context, text: str) -> None:
    if not ctx.obj.get("quiet"):
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print only what was asked for (JSON, paths).")
@click.version_option(package_name="surgery")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Make conv nets physically smaller: inspect, prune, export, bench.

    MODEL is torchvision:NAME, timm:NAME, ultralytics:NAME.yaml, path/to/file.py:factory (with
    --model-arg k=v), a directory saved by `surgery prune` (--trust-code if its model is a
    file.py), or one of our reference networks in models/.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)


model_arg = click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                         help="Keyword argument for the model factory (repeatable).")


def _set_trust(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.ensure_object(dict)
    ctx.obj["trust_code"] = ctx.obj.get("trust_code", False) or value


trust_code = click.option(
    "--trust-code", is_flag=True, expose_value=False, callback=_set_trust,
    help="Allow a saved DIR whose model is built by a Python file (file.py:factory) to run that "
         "file. Off by default: a saved directory from elsewhere must not run code.")
input_shape = click.option("--input-shape", default=None, metavar="N,C,H,W",
                           help="Example input shape (default 1,3,224,224 or the saved one).")


@cli.command(help=_help("inspect", "List the coupled channel groups of MODEL."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@click.option("--ignore", multiple=True, help="Layer name or re:regex to keep (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
@click.pass_context
def inspect(ctx: click.Context, model: str, model_args: tuple[str, ...], input_shape: str | None,
            ignore: tuple[str, ...], as_json: bool) -> None:
    from .report import group_table

    net, meta = _load(model, model_args)
    x = _torch().randn(_default_shape(meta, input_shape))
    with _step(ctx, f"tracing {model}"):
        from .graph import trace

        graph = trace(net, x, ignore=ignore)
        rows = group_table(net, graph, x)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{graph.model_class}: {len(rows)} coupled groups")
    for col in ("#", "channels", "units", "prunable", "params", "MACs", "members"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(str(r["group"]), str(r["channels"]), f"{r['free']}+{r['pinned']} pinned",
                      "yes" if r["prunable"] else f"no: {r['why']}", f"{r['params']:,}",
                      f"{r['macs']:,}", ", ".join(r["members"][:4]) +
                      (f" (+{len(r['members']) - 4})" if len(r["members"]) > 4 else ""))
    Console(width=160).print(table)


@cli.command(help=_help("prune", "Prune MODEL and write plan, weights, ONNX and a report to "
                                 "--out DIR."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@click.option("--ratio", type=float, default=None, help="Fraction of each group's channels "
                                                        "to remove, in [0, 1).")
@click.option("--target-macs", type=float, default=None,
              help="Instead of --ratio: keep at most this fraction of the MACs (e.g. 0.5).")
@click.option("--criterion", default="l2", show_default=True, help="l1, l2, bn_scale, random.")
@click.option("--round-to", default=8, show_default=True, type=int,
              help="Keep channel counts multiples of N.")
@click.option("--ignore", multiple=True, help="Layer name or re:regex to keep (repeatable).")
@click.option("--out", "out_dir", default=None, help="Output directory (replaced atomically).")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--steps", type=int, default=1, show_default=True,
              help="Reach --ratio in K steps, fine-tuning on --data between them.")
@click.option("--data", default=None, metavar="digits|DIR", help="Data for --steps fine-tuning.")
@click.option("--epochs", type=int, default=5, show_default=True,
              help="Fine-tuning epochs after each of the --steps.")
@click.option("--allocate", type=click.Choice(["uniform", *runtime_names()]), default="uniform",
              show_default=True, help="uniform: remove --ratio of every group. A runtime: "
              "remove as many MACs, from the layers where that runtime saves the most time "
              "(each layer is timed here first).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Threads the runtime is timed with for --allocate RUNTIME.")
@click.option("--exact", is_flag=True, help="Keep the channels that pass a cross-channel norm "
              "(a transformer's embedding width): the pruned model stays exactly equivalent.")
@click.option("--override", "overrides", multiple=True, metavar="LAYER=RATIO",
              help="Another ratio for the groups of LAYER (a name or re:regex; repeatable; 0 "
              "keeps them whole).")
@click.pass_context
def prune(ctx: click.Context, model: str, model_args: tuple[str, ...], input_shape: str | None,
          ratio: float | None, target_macs: float | None, criterion: str, round_to: int,
          ignore: tuple[str, ...], out_dir: str | None, no_onnx: bool, dry_run: bool,
          as_json: bool, steps: int, data: str | None, epochs: int, allocate: str,
          threads: int, exact: bool, overrides: tuple[str, ...]) -> None:
    from .api import as_config
    from .api import plan as make_plan

    if not dry_run and not out_dir:
        raise UserError("--out DIR is required (or pass --dry-run)")
    if (ratio is None) == (target_macs is None):
        raise UserError("give exactly one of --ratio or --target-macs")
    if steps < 1:
        raise UserError(f"--steps must be at least 1 but received {steps}")
    if steps > 1 and (ratio is None or data is None):
        raise UserError("--steps K needs --ratio and --data (fine-tuning runs between steps)")
    if steps == 1 and data is not None:
        raise UserError("--data is used only between --steps K > 1; to fine-tune after "
                        "pruning, run `surgery finetune DIR --data ...`")
    if ratio is not None and not 0 <= ratio < 1:
        raise UserError(f"--ratio: ratio must be a number in [0, 1) but received {ratio}")
    if allocate != "uniform" and (ratio is None or steps > 1):
        raise UserError(f"--allocate {allocate} needs --ratio (it removes as many MACs as that "
                        "ratio would) and works in one step")
    if threads < 1:
        raise UserError(f"--threads must be at least 1 but received {threads}")
    config = as_config(ratio=ratio, target_macs=target_macs, allocate=allocate, threads=threads,
                       criterion=criterion, round_to=round_to, ignore=ignore, exact=exact)
    if overrides:
        config = config.replace(overrides=_overrides(overrides))
    net, meta = _load(model, model_args)
    shape = _default_shape(meta, input_shape)
    x = _torch().randn(shape)
    if steps > 1:
        plan, small, check = _prune_in_steps(ctx, net, x, ratio, steps, data, epochs,  # type: ignore[arg-type]
                                             criterion=criterion, round_to=round_to,
                                             ignore=ignore)
        return _finish_prune(ctx, model, meta, net, small, plan, x, shape, check, out_dir,
                             no_onnx, dry_run, as_json)
    planning = f"tracing and planning {model}" if allocate == "uniform" else \
        f"timing every layer on {allocate} ({threads} threads) and planning {model}"
    with _step(ctx, planning):
        plan = make_plan(net, x, config)
    _rebuild_and_finish(ctx, model, meta, net, plan, x, shape, out_dir, no_onnx, dry_run,
                        as_json)


def _overrides(items: Sequence[str]) -> dict[str, float]:
    """``--override LAYER=RATIO`` flags as a dict (the last ``=`` splits: regexes may hold one)."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise UserError(f"--override takes LAYER=RATIO (e.g. layer4=0.2 or 're:^fc$=0'), "
                            f"not {item!r}")
    return out


def _prune_in_steps(ctx: click.Context, net: nn.Module, x: torch.Tensor, ratio: float,
                    steps: int, data: str, epochs: int, **plan_kw: Any) -> tuple[Any, Any, Any]:
    """Remove ``1 - (1 - ratio) ** (1 / steps)`` of the channels per step, fine-tune between."""
    from .plan import make_plan
    from .surgeon import apply
    from .verify import verify

    step_ratio = 1 - (1 - ratio) ** (1 / steps)
    current, total, check = net, None, None
    for k in range(steps):
        plan = make_plan(current, x, ratio=step_ratio, **plan_kw)
        small = apply(current, plan)
        check = verify(current, small, plan, x)
        total = plan if total is None else total.then(plan)
        _emit(ctx, f"step {k + 1}/{steps}: removed {plan.removed()} channel positions")
        if k < steps - 1:
            _run_training(ctx, small, data, x.shape[-1], None, 0.0, None, epochs=epochs,
                          lr=0.01, optimizer="sgd", batch_size=64, seed=k)
        current = small
    return total, current, check


def _rebuild_and_finish(ctx: click.Context, model: str, meta: dict[str, Any], net: nn.Module,
                        plan: Any, x: torch.Tensor, shape: tuple[int, ...], out_dir: str | None,
                        no_onnx: bool, dry_run: bool, as_json: bool) -> None:
    """Apply the plan, verify, and report / save (shared by prune and apply)."""
    from .surgeon import apply
    from .verify import verify

    with _step(ctx, "rebuilding layers"):
        small = apply(net, plan)
    with _step(ctx, "verifying"):
        check = verify(net, small, plan, x)
    _finish_prune(ctx, model, meta, net, small, plan, x, shape, check, out_dir, no_onnx, dry_run,
                  as_json)


def _finish_prune(ctx: click.Context, model: str, meta: dict[str, Any], net: nn.Module,
                  small: nn.Module, plan: Any, x: torch.Tensor, shape: tuple[int, ...],
                  check: Any, out_dir: str | None, no_onnx: bool, dry_run: bool,
                  as_json: bool) -> None:
    from . import artifact
    from .plan import Plan
    from .report import prune_report, to_markdown

    report = prune_report(net, small, plan, x, check, spec=model)

    def show() -> None:
        if as_json:
            click.echo(json.dumps(report, indent=1))
        else:
            _emit(ctx, to_markdown(report))

    if dry_run:
        show()
        return
    assert out_dir is not None

    def write_onnx(path: Path) -> None:
        from .export import export_onnx

        with _step(ctx, "exporting ONNX and checking parity"):
            report["onnx"] = export_onnx(small, x, path).__dict__
            report["onnx"]["path"] = "model.onnx"

    def write_reports(path: Path) -> None:
        (path.parent / "report.json").write_text(json.dumps(report, indent=1))
        path.write_text(to_markdown(report))

    extra = {} if no_onnx else {"model.onnx": write_onnx}
    extra["report.md"] = write_reports
    if os.path.isdir(model):  # pruning a saved model again: one plan for the original spec
        plan = Plan.load(Path(model) / artifact.PLAN).then(plan)
    target = artifact.save(out_dir, small, plan, spec=meta["spec"],
                           model_args=meta.get("model_args"), input_shape=shape, extra=extra)
    show()
    if not as_json:
        click.echo(str(target))


@cli.command("apply", help=_help("apply", "Apply a saved PLAN (plan.json) to a fresh MODEL of "
                                          "the architecture it was made for; verify, and write "
                                          "the same files as `prune` to --out DIR."))
@click.argument("model")
@click.argument("plan_path", metavar="PLAN")
@model_arg
@input_shape
@click.option("--out", "out_dir", required=True, help="Output directory (replaced atomically).")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export.")
@click.pass_context
def apply_cmd(ctx: click.Context, model: str, plan_path: str, model_args: tuple[str, ...],
              input_shape: str | None, out_dir: str, no_onnx: bool) -> None:
    from .plan import Plan

    if os.path.isdir(model):
        raise UserError(f"{model} is a saved DIR; `surgery apply` takes the original model spec "
                        f"(a saved DIR's plan is {model}/plan.json)")
    plan = Plan.load(plan_path)
    net, meta = _load(model, model_args)
    shape = _default_shape(meta, input_shape)
    x = _torch().randn(shape)
    _rebuild_and_finish(ctx, model, meta, net, plan, x, shape, out_dir, no_onnx, False, False)


@cli.command(help=_help("export", "Export MODEL (or a saved DIR) to ONNX, with a parity check."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@click.option("--onnx", "onnx_path", required=True, help="Where to write the .onnx file.")
@click.option("--static-batch", is_flag=True, help="Fix the batch size instead of dynamic.")
@click.pass_context
def export(ctx: click.Context, model: str, model_args: tuple[str, ...], input_shape: str | None,
           onnx_path: str, static_batch: bool) -> None:
    _check_output("--onnx", onnx_path)
    from .export import export_onnx

    net, meta = _load(model, model_args)
    x = _torch().randn(_default_shape(meta, input_shape))
    with _step(ctx, "exporting ONNX and checking parity"):
        rep = export_onnx(net, x, onnx_path, dynamic_batch=not static_batch)
    _emit(ctx, f"wrote {rep.path}: {rep.file_bytes / 1e6:.2f} MB, {rep.onnx_weights:,} weights, "
               f"ONNX Runtime max relative error {rep.max_rel_error:.2e}")


@cli.command(help=_help("bench", "Time models on PyTorch and ONNX Runtime (medians of "
                                 "alternating runs)."))
@click.argument("models", nargs=-1, required=True)
@model_arg
@trust_code
@input_shape
@click.option("--runtime", default="torch,ort", show_default=True,
              help=f"Comma list of {', '.join(runtime_names())}.")
@click.option("--batch", default="1", show_default=True, help="Comma list of batch sizes.")
@click.option("--threads", type=int, default=None,
              help="CPU threads (default: the cores other processes leave free).")
@click.option("--rounds", type=int, default=20, show_default=True,
              help="Timed runs per model, runtime and batch (alternating between models).")
@click.option("--json", "json_path", default=None, help="Write the report as JSON here.")
@click.option("--csv", "csv_path", default=None, help="Write the report as CSV here.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG plot here.")
@click.pass_context
def bench(ctx: click.Context, models: tuple[str, ...], model_args: tuple[str, ...],
          input_shape: str | None, runtime: str, batch: str, threads: int | None, rounds: int,
          json_path: str | None, csv_path: str | None, plot_path: str | None) -> None:
    from . import artifact
    from .bench import bench as run_bench
    from .report import plot

    for flag, path in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path)):
        _check_output(flag, path)
    nets: dict[str, nn.Module | None] = {}
    onnx_files: dict[str, str] = {}
    shape: tuple[int, ...] | None = _shape(input_shape) if input_shape else None
    for spec in models:
        if spec.endswith(".onnx"):
            if not os.path.isfile(spec):
                raise UserError(f"ONNX file {spec} does not exist")
            nets[spec], onnx_files[spec] = None, spec
            continue
        net, meta = _load(spec, model_args)
        shape = shape or tuple(meta.get("input_shape") or (1, 3, 224, 224))
        if os.path.isdir(spec):  # a saved artifact: compare with its original
            with _step(ctx, f"building the original {meta['spec']}"):
                nets[meta["spec"]] = artifact.build_original(spec, meta,
                                                             trust_code=_trusted())
            nets[f"{spec} (pruned)"] = net
            saved_onnx = Path(spec) / "model.onnx"
            if saved_onnx.is_file() and tuple(shape[1:]) == tuple(meta["input_shape"][1:]):
                onnx_files[f"{spec} (pruned)"] = str(saved_onnx)  # parity-checked at prune time
        else:
            nets[spec] = net
    runtimes = [r.strip() for r in runtime.split(",") if r.strip()]
    with _step(ctx, "benchmarking"):
        report = run_bench(nets, (shape or (1, 3, 224, 224))[1:], runtimes=runtimes,
                           batches=_ints(batch, "--batch"), threads=threads, rounds=rounds,
                           onnx_files=onnx_files)
    if json_path:
        Path(json_path).write_text(report.to_json())
    if csv_path:
        Path(csv_path).write_text(report.to_csv())
    if plot_path:
        plot(report, plot_path)
    _emit(ctx, report.to_markdown())


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


def _run_training(ctx: click.Context | None, net: nn.Module, data: str, size: int, teacher: Any,
                  distill: float, checkpoint: str | None, distributed: bool = False,
                  **kw: Any) -> Any:
    from .data import load as load_data
    from .finetune import FinetuneConfig, finetune

    train, val = load_data(data, size=size)
    _torch().manual_seed(kw["seed"])
    cfg = FinetuneConfig(epochs=kw["epochs"], lr=kw["lr"], optimizer=kw["optimizer"],
                         batch_size=kw["batch_size"], seed=kw["seed"], distill=distill)

    def show(log: Any) -> None:
        val_acc = f"{log.val_acc:.4f}" if log.val_acc is not None else "-"
        text = (f"epoch {log.epoch}/{cfg.epochs}: loss {log.loss:.4f}, train acc "
                f"{log.train_acc:.4f}, val acc {val_acc}")
        if ctx is None:
            click.echo(text)
        else:
            _emit(ctx, text)

    with _batch_progress(ctx, cfg.epochs) as on_batch:
        return finetune(net, train, val, teacher=teacher, config=cfg, checkpoint=checkpoint,
                        on_epoch=show, on_batch=on_batch, distributed=distributed,
                        device=kw.get("device"))


@contextlib.contextmanager
def _batch_progress(ctx: click.Context | None, epochs: int) -> Iterator[Any]:
    """A progress bar over each epoch's batches with the running loss, on a terminal only."""
    if (ctx is not None and ctx.obj.get("quiet")) or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), console=Console(stderr=True),
                  transient=True) as bar:
        task = bar.add_task("epoch 1", total=None, loss=float("nan"))
        state = {"epoch": 1}

        def on_batch(step: int, steps: int, loss: float) -> None:
            if step == 1 and bar.tasks[task].completed:
                state["epoch"] += 1
            bar.update(task, completed=step, total=steps, loss=loss,
                       description=f"epoch {state['epoch']}/{epochs}")

        yield on_batch


def _finetune_job(job: dict[str, Any]) -> None:
    """`surgery finetune`, or one rank of it (--nproc N or torchrun)."""
    import hashlib

    import torch.distributed as dist

    from . import artifact
    from .plan import Plan

    net, meta = _load(job["directory"], (), job["trust_code"])
    teacher = _load(job["teacher"], (), job["trust_code"])[0] if job["teacher"] else None
    _run_training(None, net, job["data"], job["size"], teacher, job["distill"],
                  job["checkpoint"], distributed=dist.is_initialized(), **job["kw"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    net.cpu()
    if job.get("rank_hashes"):
        h = hashlib.sha256(b"".join(t.detach().numpy().tobytes()
                                    for t in net.state_dict().values()))
        world = dist.get_world_size() if dist.is_initialized() else 1
        Path(f"{job['rank_hashes']}.rank{rank}").write_text(f"world={world} {h.hexdigest()}")
    if rank == 0:
        plan = Plan.load(Path(job["directory"]) / artifact.PLAN)
        click.echo(str(artifact.save(job["directory"], net, plan, spec=meta["spec"],
                                     model_args=meta.get("model_args"),
                                     input_shape=meta["input_shape"])))


@cli.command(help=_help("train", "Train MODEL from scratch on --data and save it to --out DIR "
                                 "(an artifact with an empty plan)."))
@click.argument("model")
@model_arg
@data_option
@size_option
@click.option("--out", "out_dir", required=True)
@click.option("--checkpoint", default=None, help="Directory for per-epoch checkpoints (resume).")
@_train_options
@click.pass_context
def train(ctx: click.Context, model: str, model_args: tuple[str, ...], data: str,
          size: int | None, out_dir: str, checkpoint: str | None, **kw: Any) -> None:
    from . import artifact
    from .graph import fingerprint
    from .plan import Plan

    if os.path.isdir(model):
        raise UserError(f"{model} is a saved model; use `surgery finetune {model}` instead")
    kwargs = parse_kwargs(model_args)
    net = build_model(model, kwargs)
    size = size or 32
    _run_training(ctx, net, data, size, None, 0.0, checkpoint, **kw)
    net.cpu()
    empty = Plan(type(net).__name__, fingerprint(net), {}, True, {"trained_on": data})
    click.echo(str(artifact.save(out_dir, net, empty, spec=model, model_args=kwargs,
                                 input_shape=(1, 3, size, size))))


@cli.command(help=_help("finetune", "Fine-tune a saved DIR on --data (optionally distilling "
                                    "from --teacher DIR) and save it back atomically."))
@click.argument("directory")
@trust_code
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
@click.pass_context
def finetune_cmd(ctx: click.Context, directory: str, data: str, size: int | None,
                 teacher: str | None, distill: float, checkpoint: str | None, nproc: int,
                 rank_hashes: str | None, **kw: Any) -> None:
    from . import artifact
    from .finetune import check_nproc, launch, resolve_device, run_under_torchrun, under_torchrun

    if not os.path.isdir(directory):
        raise UserError(f"{directory} is not a saved DIR; run `surgery prune ... --out DIR` first")
    device = resolve_device(kw["device"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    check_nproc(nproc, backend)
    if (nproc > 1 or under_torchrun()) and device.index is not None:
        raise UserError(f"--device {kw['device']} names one GPU, but each rank takes its own; "
                        "pass --device cuda")
    meta = artifact.read_meta(directory)
    job = {"directory": directory, "data": data, "teacher": teacher, "checkpoint": checkpoint,
           "size": size or int(meta["input_shape"][-1]), "kw": kw,
           "distill": distill if teacher else 0.0, "rank_hashes": rank_hashes,
           "trust_code": _trusted()}
    if under_torchrun():
        if nproc != 1:
            raise UserError("under torchrun, give the process count to torchrun "
                            "(--nproc-per-node) and leave --nproc at 1")
        run_under_torchrun(_finetune_job, job, backend=backend)
    elif nproc == 1:
        _finetune_job(job)
    else:
        launch(_finetune_job, nproc, job, backend=backend)


@cli.command(help=_help("sparsify", "Unstructured magnitude pruning (torch.nn.utils.prune), "
                                    "optional fine-tuning with the masks on, then a sparse "
                                    "weights file; reports the real file sizes and latencies."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
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
@click.pass_context
def sparsify(ctx: click.Context, model: str, model_args: tuple[str, ...],
             input_shape: str | None, amount: float, scope: str, data: str | None, epochs: int,
             lr: float, out_path: str, do_bench: bool, as_json: bool) -> None:
    import copy

    from . import sparse
    from .bench import bench as run_bench

    if epochs > 0 and data is None:
        raise UserError("--epochs needs --data (the data to fine-tune on)")
    if not Path(out_path).parent.is_dir():
        raise UserError(f"cannot write {out_path}: folder {Path(out_path).parent} does not exist")
    net, meta = _load(model, model_args)
    shape = _default_shape(meta, input_shape)
    dense = copy.deepcopy(net)
    sparse.magnitude_prune_(net, amount, scope=scope)
    if epochs > 0:
        _run_training(ctx, net, data, shape[-1], None, 0.0, None, epochs=epochs, lr=lr,  # type: ignore[arg-type]
                      optimizer="sgd", batch_size=64, seed=0)
    sparse.make_permanent_(net)
    sparse_bytes = sparse.save_sparse(net, out_path)
    dense_bytes = sparse.dense_bytes(dense)
    stats = sparse.sparsity(net)
    report: dict[str, Any] = {"file": out_path, "sparsity": stats.overall,
                              "zero_weights": stats.zeros, "prunable_weights": stats.total,
                              "dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes,
                              "size_ratio": dense_bytes / sparse_bytes, "latency": None}
    if do_bench:
        with _step(ctx, "benchmarking dense vs zeroed"):
            rep = run_bench({"dense": dense, "unstructured": net}, shape[1:],
                            runtimes=["torch", "ort"], batches=[1], rounds=10)
        report["latency"] = [{"model": r.model, "runtime": r.runtime, "median_ms": r.median_ms,
                              "speedup": r.speedup} for r in rep.rows]
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    _emit(ctx, f"{stats.overall:.1%} of {stats.total:,} conv/linear weights are zero")
    _emit(ctx, f"wrote {out_path}: {sparse_bytes / 1e6:.2f} MB (dense safetensors "
               f"{dense_bytes / 1e6:.2f} MB, {report['size_ratio']:.2f}x smaller on disk)")
    for r in report["latency"] or []:
        sp = f", speedup {r['speedup']:.2f}x" if r["speedup"] is not None else ""
        _emit(ctx, f"{r['runtime']:>5} {r['model']:>12}: {r['median_ms']:.2f} ms (median){sp}")
    if report["latency"]:
        _emit(ctx, "dense kernels skip no zeros: the same latency is the expected result; "
                   "`surgery prune` removes whole channels and does get faster")




#: keyword arguments of the Python API as the command line spells them
_FLAGS = ("target_macs", "round_to", "criterion", "device", "allocate", "threads", "ratio")


def as_flags(message: str) -> str:
    """A library message in command-line words: ``ignore=['a', 'b']`` -> ``--ignore a --ignore
    b``, ``target_macs=`` -> ``--target-macs``, ``trust_code=True`` -> ``--trust-code``."""
    import re

    def ignore(m: re.Match[str]) -> str:
        names = re.findall(r"'([^']*)'|\"([^\"]*)\"", m.group(1))
        return " ".join(f"--ignore {a or b}" for a, b in names) or "--ignore LAYER"

    message = re.sub(r"\bignore=\[([^\]]*)\]", ignore, message)
    message = re.sub(r"\btrust_code=True\b", "--trust-code", message)
    return re.sub(r"\b(" + "|".join(_FLAGS) + r")=(?=\S)",
                  lambda m: f"--{m.group(1).replace('_', '-')} ", message)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    click.echo(f"warning: {as_flags(str(message))}", err=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: temp files go, outputs stay whole


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if argv is None:
        import signal

        signal.signal(signal.SIGTERM, _terminate)
    if not debug:
        import warnings

        warnings.showwarning = _show_warning
    try:
        rv = cli.main(args=args, prog_name="surgery", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 1
    except (SurgeryError, SpecError, OSError) as e:  # the user's input or machine
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        click.echo(f"error: {as_flags(first)}", err=True)
        return 1
    except Exception as e:  # a bug in surgery, not the user's fault
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the "
                   "traceback and please report it)", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
