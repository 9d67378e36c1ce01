"""Atomic file writes: a write killed midway never leaves a half-written file at the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(dest: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp file beside `dest`, then rename it over `dest`.

    The temp file gets the permissions a plain `open(dest, "w")` would (0666 less the umask),
    not mkstemp's 0600. On any error the temp file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(Path(tmp))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
