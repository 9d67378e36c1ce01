"""What the three CLIs (`train`, `sample`, `quality`) share: one-line errors and output checks.

Bad input ends with exactly one line `<prog>: error: <message>` on stderr and exit code 2, never a
traceback (issue 22): `Parser` reports argparse's own errors that way (without the usage block),
and `run` does the same for the user errors the command raises (`UserError`, `ValueError`,
`OSError`). Ctrl-C is one line too, with exit code 130. Anything else is a bug and keeps its
traceback. Outputs are checked before any work starts (`check_out_file`, `check_out_dir`), so a
bad path never throws away a finished run, and nothing is written under the current directory
unless asked: defaults live in `cache_dir()`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(Exception):
    """Bad input, reported as one line."""


class Parser(argparse.ArgumentParser):
    """argparse that raises `UserError` (one line, no usage block) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message)


def one_line(err: BaseException) -> str:
    """`err`'s message on one line (library messages, torch's included, can span several)."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, KeyError):  # str(KeyError('x')) is "'x'"
        text = f"missing key {text}"
    return text or type(err).__name__


def fail(prog: str, err: BaseException | str) -> int:
    message = err if isinstance(err, str) else one_line(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def interrupted(prog: str, message: str) -> int:
    print(f"{prog}: interrupted: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse `argv` and call `body(args)`; a user error becomes one line and exit code 2."""
    try:
        return body(parser.parse_args(argv))
    except (UserError, ValueError, OSError) as err:
        return fail(parser.prog, err)
    except KeyboardInterrupt:
        return interrupted(parser.prog, "stopped before the end; no partial output was written")


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Within the block, the first SIGINT or SIGTERM only sets a flag, which the yielded function
    reports (the work stops at its next safe point); a second one raises KeyboardInterrupt at
    once. The previous handlers come back on exit. Off the main thread it does nothing."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cache_dir() -> Path:
    """Where outputs go by default: `$XDG_CACHE_HOME/diffusion_ext` (`~/.cache/diffusion_ext`)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            raise UserError(
                "no home folder for the default output: pass an explicit path"
            ) from None
    return Path(base) / "diffusion_ext"


def check_out_dir(path: Path, flag: str) -> None:
    """Create `path` (and parents) and check a file can be written in it; `UserError` if not."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path} is not writable: {err.strerror or err}") from None


def check_out_file(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """`path` has one of `suffixes`, is not a folder, and its folder is writable (created)."""
    if path.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {path}: the file name must end in {' or '.join(suffixes)} "
            f"(the format written), got {path.suffix or 'no suffix'!r}"
        )
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} exists and is read-only")
    check_out_dir(path.parent, f"{flag}'s folder")
