"""Building shared artifacts exactly once when several ranks start at the same moment."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import DataError


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns `target`, calling `build(tmp)` to create it if it is missing.

    A file lock makes the other ranks wait instead of doing the same work, and
    building into a temporary path that is renamed into place means a crash
    mid-build never leaves a half-written artifact behind for the next run.
    The artifacts live in data.cache_dir, which every rank must be able to write.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "a")
    except OSError as e:
        raise DataError(f"cannot cache data in {target.parent} ({e.strerror}); set data.cache_dir (or "
                        "$PARALLAX_CACHE) to a directory you can write") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")) / target.name
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp.parent)
    return target
