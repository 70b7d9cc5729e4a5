"""The `surgery` commands on models: inspect, prune, apply, export, bench.

Each parses its flags, calls the library (:func:`surgery.plan`, :func:`surgery.apply`,
:func:`surgery.verify`, :func:`surgery.artifact.save_pruned`, :func:`surgery.export_onnx`,
:func:`surgery.bench`) and shows the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .cli import (
    EXAMPLES,
    UserError,
    check_out_dir,
    check_output,
    cli,
    console,
    example_input,
    example_shape,
    ignore_option,
    input_shape,
    ints,
    load_model,
    model_arg,
    train_on,
    trust_code,
    usage,
)
from .runtimes import runtime_names
from .spec import parse_kwargs

if TYPE_CHECKING:
    from torch import nn

EXAMPLES.update({
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
})


@cli.command(help=usage("inspect", "List the coupled channel groups of MODEL."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@ignore_option
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def inspect(model: str, model_args: tuple[str, ...], input_shape: str | None,
            ignore: tuple[str, ...], as_json: bool) -> None:
    from .graph import trace
    from .report import group_table, print_group_table

    net, meta = load_model(model, model_args)
    x = example_input(example_shape(meta, input_shape))
    with console().step(f"tracing {model}"):
        graph = trace(net, x, ignore=ignore)
        rows = group_table(net, graph, x)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        print_group_table(graph.model_class, rows)


@cli.command(help=usage("prune", "Prune MODEL and write plan, weights, ONNX and a report to "
                                 "--out DIR."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@click.option("--ratio", type=float, default=None, help="Fraction of each group's channels "
                                                        "to remove, in [0, 1).")
@click.option("--target-macs", type=float, default=None,
              help="Instead of --ratio: keep at most this fraction of the MACs (e.g. 0.5).")
@click.option("--target-speedup", type=float, default=None, help="Instead of --ratio: prune "
              "until the model measures this many times faster on --runtime (plan, build, "
              "time, correct, repeat).")
@click.option("--target-latency", type=float, default=None, metavar="MS",
              help="Instead of --ratio: prune until the model runs in MS milliseconds there.")
@click.option("--runtime", type=click.Choice(runtime_names()), default="ort", show_default=True,
              help="Where --target-speedup/--target-latency are measured.")
@click.option("--batch", default=None, help="Batch size the runtime times: a latency "
              "target's (default 1; several, e.g. 1,8: the target is their geometric-mean "
              "speedup) or --allocate RUNTIME's (default: the example's).")
@click.option("--floor-batch", default=None, metavar="B[,B]", help="With a latency target: "
              "also time a landing at these batch sizes; each must reach 0.9x the target "
              "(else the search aims higher at --batch).")
@click.option("--criterion", default="l2", show_default=True, help="l1, l2, bn_scale, random.")
@click.option("--round-to", default=8, show_default=True, type=int,
              help="Keep channel counts multiples of N.")
@ignore_option
@click.option("--override", "overrides", multiple=True, metavar="LAYER=RATIO",
              help="Another ratio for the groups of LAYER (a name or re:regex; repeatable; 0 "
              "keeps them whole).")
@click.option("--exact", is_flag=True, help="Keep the channels that pass a cross-channel norm "
              "(a transformer's embedding width): the pruned model stays exactly equivalent.")
@click.option("--allocate", type=click.Choice(["uniform", *runtime_names()]), default="uniform",
              show_default=True, help="uniform: remove --ratio of every group. A runtime: "
              "remove as many MACs, from the layers where that runtime saves the most time "
              "(each layer is timed here first).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Threads the runtime is timed with for --allocate RUNTIME.")
@click.option("--depth", is_flag=True, help="With --allocate RUNTIME: also bypass whole residual "
              "blocks and gates (x + f(x) -> x, x * gate -> x) where that saves more time than "
              "narrowing them.")
@click.option("--steps", type=int, default=1, show_default=True,
              help="Reach --ratio in K steps, fine-tuning on --data between them.")
@click.option("--data", default=None, metavar="digits|DIR", help="Data for --steps "
              "fine-tuning; with --depth, --samples of its images decide which blocks may go "
              "(their output change), while timing stays at --batch.")
@click.option("--samples", type=int, default=16, show_default=True,
              help="Images of --data that score the blocks for --depth.")
@click.option("--epochs", type=int, default=5, show_default=True,
              help="Fine-tuning epochs after each of the --steps.")
@click.option("--out", "out_dir", default=None, help="Output directory (replaced atomically).")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prune(model: str, model_args: tuple[str, ...], input_shape: str | None,
          overrides: tuple[str, ...], steps: int, data: str | None, samples: int, epochs: int,
          out_dir: str | None, no_onnx: bool, dry_run: bool, as_json: bool, **settings: Any
          ) -> None:
    from .api import as_config, plan, prune_in_steps
    from .config import RuntimeAware, parse_overrides
    from .finetune import FinetuneConfig

    if not dry_run and not out_dir:
        raise UserError("--out DIR is required (or pass --dry-run)")
    out_dir = None if dry_run else out_dir
    check_out_dir("--out", out_dir)
    asked = [k for k in ("ratio", "target_macs", "target_speedup", "target_latency")
             if settings[k] is not None]
    if len(asked) != 1:
        raise UserError("give exactly one of --ratio or --target-macs (or --target-speedup, "
                        "--target-latency)")
    if steps < 1 or steps > 1 and (settings["ratio"] is None or data is None):
        raise UserError(f"--steps must be at least 1 but received {steps}" if steps < 1 else
                        "--steps K needs --ratio and --data (fine-tuning runs between steps)")
    if steps == 1 and data is not None and not settings["depth"]:
        raise UserError("--data is used between --steps K > 1 and to score blocks for --depth; "
                        "to fine-tune after pruning, run `surgery finetune DIR --data ...`")
    if samples < 1:
        raise UserError(f"--samples must be at least 1 but received {samples}")
    target = settings["target_speedup"] or settings["target_latency"]
    if settings["allocate"] != "uniform" and (settings["ratio"] is None and target is None
                                              or steps > 1):
        raise UserError(f"--allocate {settings['allocate']} needs --ratio (it removes as many "
                        "MACs as that ratio would) and works in one step")
    if settings["threads"] < 1:
        raise UserError(f"--threads must be at least 1 but received {settings['threads']}")
    if settings["batch"] is not None:
        sizes = ints(settings["batch"], "--batch")
        settings["batch"] = sizes[0] if len(sizes) == 1 else tuple(sizes)
    settings["floor_batch"] = () if settings["floor_batch"] is None else ints(
        settings["floor_batch"], "--floor-batch")
    if settings["depth"] and settings["allocate"] == "uniform":
        raise UserError("--depth needs --allocate RUNTIME (bypassed blocks are weighed against "
                        "narrower layers by their time on that runtime)")
    config = as_config(**settings)
    if overrides:
        config = config.replace(overrides=parse_overrides(overrides))
    net, meta = load_model(model, model_args)
    x = example_input(example_shape(meta, input_shape))
    out = console()
    if steps > 1:
        tune = FinetuneConfig(epochs=epochs, lr=0.01, optimizer="sgd", batch_size=64)
        p, small, check = prune_in_steps(
            net, x, config, steps,  # type: ignore[arg-type]
            on_step=lambda k, p: out.emit(f"step {k + 1}/{steps}: removed {p.removed()} "
                                          "channel positions"),
            between=lambda m, k: train_on(m, data, x.shape[-1],  # type: ignore[arg-type]
                                        FinetuneConfig(**{**tune.__dict__, "seed": k})))
        return _finish(model, meta, net, small, p, x, check, out_dir, no_onnx, as_json)
    def round_done(k: int, ratio: float, ms: float, speedup: float) -> None:
        out.progress(f"round {k + 1}: ratio {ratio:.3f} -> {ms:.2f} ms on "
                     f"{settings['runtime']}, {speedup:.2f}x faster")

    scored = x
    if data is not None:  # --depth: real images decide which blocks may go; time the example's
        from .data import samples as data_samples

        with out.step(f"reading {samples} images of {data}"):
            scored = data_samples(data, samples, size=x.shape[-1])
        if tuple(scored.shape[1:]) != tuple(x.shape[1:]):
            raise UserError(f"--data {data} gives images of shape {tuple(scored.shape[1:])} but "
                            f"{model} takes {tuple(x.shape[1:])} (--input-shape)")
        if isinstance(config, RuntimeAware) and config.batch is None:
            config = config.replace(batch=int(x.shape[0]))
    with out.step(f"tracing and planning {model}" if settings["allocate"] == "uniform" else
                  f"timing every layer on {settings['allocate']} ({settings['threads']} "
                  f"threads) and planning {model}"):
        p = plan(net, scored, config, on_round=round_done)
    _rebuild(model, meta, net, p, x, out_dir, no_onnx, as_json)


def _rebuild(model: str, meta: dict[str, Any], net: nn.Module, plan: Any, x: Any,
             out_dir: str | None, no_onnx: bool, as_json: bool, from_file: bool = False) -> None:
    """Apply the plan (``from_file``: first checked against the traced
    model), verify, and report / save (prune and apply)."""
    from .surgeon import apply
    from .verify import verify

    with console().step("checking the plan and rebuilding layers" if from_file else
                        "rebuilding layers"):
        small = apply(net, plan, x if from_file else None)
    with console().step("verifying"):
        check = verify(net, small, plan, x)
    _finish(model, meta, net, small, plan, x, check, out_dir, no_onnx, as_json)


def _finish(model: str, meta: dict[str, Any], net: nn.Module, small: nn.Module, plan: Any,
            x: Any, check: Any, out_dir: str | None, no_onnx: bool, as_json: bool) -> None:
    from .artifact import save_pruned
    from .report import prune_report, to_markdown

    out = console()
    if out_dir is None:  # --dry-run
        report = prune_report(net, small, plan, x, check, spec=model)
    else:
        target, report = save_pruned(
            out_dir, net, small, plan, x, check, source=model, meta=meta, onnx=not no_onnx,
            exporting=lambda: out.step("exporting ONNX and checking parity"))
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        out.emit(to_markdown(report))
    if out_dir is not None and not as_json:
        click.echo(str(target))


@cli.command("apply", help=usage("apply", "Apply a saved PLAN (plan.json) to a fresh MODEL of "
                                          "the same architecture, verify, and write the same "
                                          "files as `prune` to --out DIR."))
@click.argument("model")
@click.argument("plan_path", metavar="PLAN")
@model_arg
@input_shape
@click.option("--out", "out_dir", required=True, help="Output directory (replaced atomically).")
@click.option("--no-onnx", is_flag=True, help="Skip the ONNX export.")
def apply_cmd(model: str, plan_path: str, model_args: tuple[str, ...], input_shape: str | None,
              out_dir: str, no_onnx: bool) -> None:
    from .plan import Plan

    if os.path.isdir(model):
        raise UserError(f"{model} is a saved DIR; `surgery apply` takes the original model spec "
                        f"(a saved DIR's plan is {model}/plan.json)")
    check_out_dir("--out", out_dir)
    plan = Plan.load(plan_path)
    net, meta = load_model(model, model_args)
    x = example_input(example_shape(meta, input_shape))
    _rebuild(model, meta, net, plan, x, out_dir, no_onnx, False, from_file=True)


@cli.command(help=usage("export", "Export MODEL (or a saved DIR) to ONNX, with a parity check."))
@click.argument("model")
@model_arg
@trust_code
@input_shape
@click.option("--onnx", "onnx_path", required=True, help="Where to write the .onnx file.")
@click.option("--static-batch", is_flag=True, help="Fix the batch size instead of dynamic.")
def export(model: str, model_args: tuple[str, ...], input_shape: str | None, onnx_path: str,
           static_batch: bool) -> None:
    from .export import export_onnx

    check_output("--onnx", onnx_path)
    net, meta = load_model(model, model_args)
    with console().step("exporting ONNX and checking parity"):
        rep = export_onnx(net, example_input(example_shape(meta, input_shape)), onnx_path,
                          dynamic_batch=not static_batch)
    console().emit(f"wrote {rep.path}: {rep.file_bytes / 1e6:.2f} MB, {rep.onnx_weights:,} "
                    f"weights, ONNX Runtime max relative error {rep.max_rel_error:.2e}")


@cli.command(help=usage("bench", "Time models on PyTorch and ONNX Runtime (medians of "
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
def bench(models: tuple[str, ...], model_args: tuple[str, ...], input_shape: str | None,
          runtime: str, batch: str, threads: int | None, rounds: int, json_path: str | None,
          csv_path: str | None, plot_path: str | None) -> None:
    from .bench import bench as run_bench
    from .bench import models_to_bench
    from .report import plot

    for flag, path in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path)):
        check_output(flag, path)
    shape = ints(input_shape, "--input-shape") if input_shape else None
    with console().step("building the models"):
        nets, onnx_files, shape = models_to_bench(
            models, parse_kwargs(model_args), input_shape=shape,
            trust_code=click.get_current_context().obj.get("trust_code", False))
    with console().step("benchmarking") as doing:
        report = run_bench(nets, shape[1:], runtimes=[r.strip() for r in runtime.split(",")
                                                      if r.strip()],
                           batches=ints(batch, "--batch"), threads=threads, rounds=rounds,
                           onnx_files=onnx_files, progress=doing)
    for path, text in ((json_path, report.to_json), (csv_path, report.to_csv)):
        if path:
            Path(path).write_text(text())
    if plot_path:
        plot(report, plot_path)
    console().emit(report.to_markdown())


