"""Building shared artifacts exactly once when several ranks start at the same moment."""

import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Returns `target`, calling `build(tmp)` to create it if it is missing.

    A file lock makes the other ranks wait instead of doing the same work, and
    building into a temporary path that is renamed into place means a crash
    mid-build never leaves a half-written artifact behind for the next run.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")) / target.name
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp.parent)
    return target
