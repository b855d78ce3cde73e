"""Bad input a user can fix, and how command-line apps report it.

Every error that names a bad file, line, key or value (a config key, a profile, a trace, an adapter
or checkpoint file) is a `UserError` as well as its usual built-in type. The apps print such an error
as one line, without a traceback, unless HYDRA_FULL_ERROR=1 asks for the stack; bugs (a policy's bad
decision, a stalled simulation, anything else) keep their traceback.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
from os import PathLike
from pathlib import Path
from typing import Callable, Sequence, TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """Bad input, with a message that says what and where."""


def require_extra(prog: str, what: str, modules: Sequence[str], extra: str, how: str) -> None:
    """Exit with one line naming what is missing and the command that installs it (`how`), when one of
    `modules` (the `extra`'s) is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{prog}: {what} needs {', '.join(missing)} (the `{extra}` extra), not installed here: run {how}",
              file=sys.stderr)
        raise SystemExit(2)


def reported(prog: str) -> Callable[[F], F]:
    """Run `fn`; a UserError becomes `prog: message` on stderr and exit status 2, and the folder Hydra
    made for the refused job goes too (a refused command leaves no folder behind)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                discard_job_folder()
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"{prog}: {e}", file=sys.stderr)
                raise SystemExit(2) from None
        return run  # type: ignore[return-value]
    return wrap


def discard_job_folder() -> None:
    """Remove the running Hydra job's folder if it holds only what Hydra put there (.hydra/, its log),
    and the parents this leaves empty (outputs/<date>/<time>): nothing of a refused run stays."""
    try:
        from hydra.core.hydra_config import HydraConfig
        if not HydraConfig.initialized():
            return
        out = Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:
        return
    cwd = Path.cwd().resolve()
    if out == cwd or not out.is_dir() or cwd not in out.parents:
        return
    job_log = out / f"{HydraConfig.get().job.name}.log"
    if any(p.name != ".hydra" and p != job_log for p in out.iterdir()):
        return   # anything else there (a user's files, an earlier run) stays
    shutil.rmtree(out / ".hydra", ignore_errors=True)
    job_log.unlink(missing_ok=True)
    for folder in (out, *out.parents):
        if folder == cwd or any(folder.iterdir()):
            break
        folder.rmdir()


class TraceFormatError(ValueError, UserError):
    """A malformed trace row or file; the message names the file, the line and the column/key."""

    def __init__(self, path: str | PathLike, line: int | None, message: str, column: str | None = None):
        self.path = str(path)
        self.line = line
        self.column = column
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" (column {column!r})" if column is not None else ""
        super().__init__(f"{where}{what}: {message}")


class TraceNotFoundError(FileNotFoundError, UserError):
    """A trace file that is in none of the places we look; the message lists them and how to fetch it."""
