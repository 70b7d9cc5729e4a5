"""What the command line shows while it works: one spinner, one progress bar, plain lines.

All of it goes to stderr, so stdout (``--json``, a path, a table) stays clean. On a terminal
the spinner and the bar redraw in place; elsewhere (a pipe, a log file, CI) the same progress
is a few plain lines, each starting with ``...`` (one per step and round, and one every
:data:`EVERY` seconds of a long epoch, never one per batch), and an error is the one line that
starts with ``error:``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

BatchHook = Callable[[int, int, float], None]

#: what starts a plain progress line when stderr is not a terminal
PREFIX = "... "
#: seconds between two plain lines inside one epoch (a long one still shows it is alive)
EVERY = 30.0


class Console:
    """Output settings of one command: ``quiet`` prints only what was asked for."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def emit(self, text: str) -> None:
        """A line on stdout, unless quiet."""
        if not self.quiet:
            click.echo(text)

    def progress(self, text: str) -> None:
        """A progress line on stderr (stdout stays for results), unless quiet."""
        if not self.quiet:
            click.echo(text if sys.stderr.isatty() else PREFIX + text, err=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[Callable[[str], None]]:
        """A spinner for anything that may take more than a moment (a plain line when stderr is
        not a terminal); yields ``update(text)`` for what it is doing now."""
        if self.quiet:
            yield lambda text: None
            return
        if not sys.stderr.isatty():
            self.progress(text)
            yield self.progress
            return
        from rich.console import Console as RichConsole

        with RichConsole(stderr=True).status(text) as status:
            yield lambda now: status.update(f"{text}: {now}")

    @contextlib.contextmanager
    def batches(self, epochs: int) -> Iterator[BatchHook | None]:
        """A progress bar over each epoch's batches with the running loss (a line per epoch
        when stderr is not a terminal): yields the ``on_batch(step, steps, loss)`` hook for
        :func:`surgery.finetune`."""
        if self.quiet:
            yield None
            return
        if not sys.stderr.isatty():
            yield self._epoch_lines(epochs)
            return
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"),
                      console=RichConsole(stderr=True), transient=True) as bar:
            task = bar.add_task("epoch 1", total=None, loss=float("nan"))
            state = {"epoch": 1}

            def on_batch(step: int, steps: int, loss: float) -> None:
                if step == 1 and bar.tasks[task].completed:
                    state["epoch"] += 1
                bar.update(task, completed=step, total=steps, loss=loss,
                           description=f"epoch {state['epoch']}/{epochs}")

            yield on_batch

    def _epoch_lines(self, epochs: int) -> BatchHook:
        """``on_batch`` for a pipe: a line every :data:`EVERY` seconds within an epoch (each
        epoch's own line is the command's on stdout)."""
        state = {"epoch": 0, "last": time.monotonic()}

        def on_batch(step: int, steps: int, loss: float) -> None:
            if step == 1:
                state["epoch"] += 1
            now = time.monotonic()
            if step < steps and now - state["last"] >= EVERY:
                state["last"] = now
                self.progress(f"epoch {state['epoch']}/{epochs}: batch {step}/{steps}, "
                              f"loss {loss:.4f}")

        return on_batch


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


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    click.echo(f"warning: {as_flags(str(message))}", err=True)
