"""Writing files and directories so that a kill at any moment leaves the old or the complete new
one, never a half-written one; leftovers of killed runs are cleaned by the next one.

A file is written to a hidden temp file beside it and renamed over it (:func:`atomic_file`).

The new directory is written as a hidden sibling ``.NAME.tmp-PID-XXXX`` and swapped in with one
``renameat2(RENAME_EXCHANGE)`` (Linux): the name never points at nothing. Where the exchange is not
available, two renames are used and a directory left aside (``.NAME.old-PID-XXXX``) is put back by
the next run. Siblings named after a process that no longer runs are ours and stale: removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(target: Path) -> Iterator[tuple[Path, str, int]]:
    """Our siblings of ``target``: (path, "tmp" or "old", pid)."""
    prefix = f".{target.name}."
    for p in target.parent.glob(f"{prefix}*"):
        kind, _, rest = p.name[len(prefix):].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit():
            yield p, kind, int(pid)


def recover(target: str | os.PathLike[str]) -> None:
    """Put back a directory a killed swap left aside, and remove stale temp dirs of ours."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for p, kind, pid in sorted(_ours(target)):
        if _alive(pid) and pid != os.getpid():
            continue
        if kind == "old" and not target.exists() and (p / "x").is_dir():
            os.replace(p / "x", target)
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def replacing(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh hidden sibling directory to write; on success it becomes ``target``.

    On any error (or KeyboardInterrupt / SIGTERM turned into one) the sibling is removed and
    ``target`` is untouched.
    """
    target = Path(target)
    recover(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        yield tmp
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old directory
            return
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent,
                                        prefix=f".{target.name}.old-{os.getpid()}-"))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwritable(folder: str | os.PathLike[str]) -> str:
    """Why no file can be created in ``folder``, or "" where one can. Tried for real, since
    ``os.access`` says yes to root everywhere (a read-only mount, ``/proc``)."""
    f = Path(folder)
    if not f.is_dir():
        return (f"{f} is a file, not a folder" if f.exists() else
                f"folder {f} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=f):
            pass
    except OSError:
        return f"folder {f} is not writable"
    return ""


def default_mode(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give a temp file/dir the permissions a plain open()/mkdir() would (mkstemp uses 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temp path beside ``target`` to write; on success it becomes ``target``
    (with the permissions a plain open() gives); on any error it is removed and ``target`` is
    untouched."""
    target = Path(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"folder {target.parent} does not exist; create it first")
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        default_mode(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically."""
    with atomic_file(target) as tmp:
        tmp.write_text(text)
