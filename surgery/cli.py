"""The `surgery` command line: a thin shell over the library.

This module holds the command group, the options and argument parsing the commands share, and
``main`` (errors to exit codes); the commands live in :mod:`surgery.cli_model` (inspect, prune,
apply, export, bench) and :mod:`surgery.cli_training` (train, finetune, sparsify).

Exit codes: 0 ok, 1 user error (one-line message; --debug for the traceback), 2 internal error.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .atomic import unwritable
from .console import Console, as_flags, show_warning
from .errors import SurgeryError
from .spec import SpecError, parse_kwargs

#: a click option, as the commands stack them
Decorator = Callable[[Any], Any]

if TYPE_CHECKING:  # torch is imported where a command needs it: `surgery --help` stays fast
    from torch import nn

#: command -> its help examples (each command module adds its own)
EXAMPLES: dict[str, str] = {}


def usage(cmd: str, text: str) -> str:
    """The command's help with its examples kept one per line (click's \\b: no rewrapping)."""
    return f"{text}\n\nExamples:\n\n\b\n  {EXAMPLES[cmd]}"


class UserError(SurgeryError, ValueError):
    """A bad command-line argument."""


def ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"{what} {text!r} is not a comma-separated list of ints") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{what} {text!r} must be positive" +
                        (" sizes" if what == "--input-shape" else ""))
    return values


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    from .spec import build_model as build

    return build(spec, kwargs)


def load_model(spec: str, model_args: Sequence[str] = ()) -> tuple[nn.Module, dict[str, Any]]:
    """A model from a spec (through build_model) or a saved directory, and what is recorded."""
    from .artifact import load_any

    if os.path.isdir(spec) or spec.endswith(".onnx"):
        return load_any(spec, trust_code=click.get_current_context().obj.get("trust_code", False))
    kwargs = parse_kwargs(model_args)
    return build_model(spec, kwargs), {"spec": spec, "model_args": kwargs}


def example_shape(meta: dict[str, Any], given: str | None) -> tuple[int, ...]:
    return ints(given, "--input-shape") if given else \
        tuple(meta.get("input_shape") or (1, 3, 224, 224))


def example_input(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.randn(shape)


def check_output(flag: str, path: str | None) -> None:
    """Refuse an output file that cannot be written, before any work is done."""
    p = Path(path) if path else None
    if p is None:
        return
    if p.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    why = unwritable(p.parent)
    if why:
        raise UserError(f"{flag} {path}: {why}")


def check_out_dir(flag: str, path: str | None) -> None:
    """Refuse an output directory whose parent folder is missing, before any work is done (the
    directory itself may exist: it is replaced)."""
    if not path:
        return
    why = unwritable(Path(path).parent)
    if why:
        raise UserError(f"{flag} {path}: {why}")


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
    ctx.obj.update(debug=debug, console=Console(quiet))


def console() -> Console:
    return click.get_current_context().obj["console"]


def _set_trust(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    ctx.ensure_object(dict)
    ctx.obj["trust_code"] = ctx.obj.get("trust_code", False) or value


model_arg: Decorator = click.option("--model-arg", "model_args", multiple=True, metavar="K=V",
                         help="Keyword argument for the model factory (repeatable).")
trust_code: Decorator = click.option(
    "--trust-code", is_flag=True, expose_value=False, callback=_set_trust,
    help="Allow a saved DIR whose model is built by a Python file (file.py:factory) to run that "
         "file. Off by default: a saved directory from elsewhere must not run code.")
input_shape: Decorator = click.option("--input-shape", default=None, metavar="N,C,H,W",
                           help="Example input shape (default 1,3,224,224 or the saved one).")
ignore_option: Decorator = click.option("--ignore", multiple=True,
                             help="Layer name or re:regex to keep (repeatable).")


def train_on(net: nn.Module, data: str, size: int, config: Any, **kw: Any) -> Any:
    """Fine-tune ``net`` on named data, showing a progress bar and one line per epoch."""
    from .finetune import finetune_on

    out = console()
    with out.batches(config.epochs) as on_batch:
        return finetune_on(net, data, size=size, config=config, on_batch=on_batch,
                           on_epoch=lambda log: out.emit(log.line(config.epochs)), **kw)


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

        warnings.showwarning = show_warning
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


if not TYPE_CHECKING:  # the commands register on `cli` (mypy checks them on their own: no cycle)
    from . import cli_model, cli_training  # noqa: E402,F401

if __name__ == "__main__":  # python -m surgery.cli: the commands registered on surgery.cli's group
    from surgery.cli import main as package_main

    sys.exit(package_main())
