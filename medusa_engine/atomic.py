"""Atomic file writes: a write killed midway never leaves a half-written file at the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_mode() -> int:
    """The permissions `open(path, "w")` gives a new file: 0666 less the process's umask."""
    try:  # Linux: read it, without the moment of umask 0 that setting it to read it costs
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("Umask:"))
        umask = int(line.split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(dest: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp file beside `dest`, then rename it over `dest`.

    `dest` ends with the permissions a plain `open(dest, "w")` would give it (0666 less the
    umask), not mkstemp's 0600: they are set after `write`, which may replace the temp file
    (safetensors' `save_file` writes a file of its own and renames it over the path it is given).
    On any error the temp file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
