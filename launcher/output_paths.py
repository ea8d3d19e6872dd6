"""Where a command or a run writes, checked before it works.

A destination that cannot be written used to fail only when the result was ready (after an
evaluation, an export, a consolidation) and with a traceback; one that should not be written (a
checkpoint's own files, a directory holding other files) was written over. Every path a user names
for output is checked here first and refused in one line (ConfigError) that names it and says what
to do. Nothing is created here but a file's directory (output_file): a directory command that is
refused later (an export of a model with no Hugging Face twin) leaves nothing behind.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from launcher.config import ConfigError
from parallel.checkpoint import MANIFEST


def output_file(out: Optional[str], what: str, default: Optional[Path] = None) -> Path:
    """The file a command writes, ready to be written: `out`, as the user named it with `what` (a flag or
    config field), or `default` when `out` is None. A named file must not be a directory nor inside a
    checkpoint; the command's own default may be (eval.json beside the checkpoint it evaluates). Its
    directory must be writable, and is made here: the writers (torch.save, a rank's write_text) do not."""
    if out is None:
        path = default
    else:
        path = _named(out, what)
        if path.is_dir():
            raise ConfigError(f"{what} {path} is a directory; name the file to write")
        _refuse_inside_checkpoint(path, what)
    _require_writable(path.parent, what, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def output_directory(out: str, what: str, *, new_or_empty: bool = False) -> Path:
    """The directory `out`, named by `what`, that its command can create or write in: not a file, not
    inside a checkpoint, and with `new_or_empty` holding nothing yet (a command that writes a set of
    files must not mix them with, or silently replace, another set)."""
    path = _named(out, what)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; name a directory")
    _refuse_inside_checkpoint(path, what)
    if new_or_empty and path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{what} {path} is not empty; name a new or empty directory")
    _require_writable(path, what, path)
    return path


def _named(out: str, what: str) -> Path:
    """`out` as a path; an empty string would be the current directory, which nobody means."""
    if not str(out).strip():
        raise ConfigError(f"{what} is empty; name a path")
    return Path(out)


def _refuse_inside_checkpoint(path: Path, what: str) -> None:
    """A checkpoint directory (one holding a manifest) is for its own files: writing there can destroy
    them, and pruning deletes whatever else is in it."""
    absolute = path.resolve()
    for directory in (absolute, *absolute.parents):
        if (directory / MANIFEST).is_file():
            raise ConfigError(f"{what} {path} writes into checkpoint {directory}; name a path outside it")


def _require_writable(directory: Path, what: str, path: Path) -> None:
    """Refuse unless a file can be created in `directory` or, where it does not exist yet, in the nearest
    directory above it that does (from which it can then be made). A file is created and dropped at once
    to find out: a permission check passes for root even where nothing can be created (/proc)."""
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a directory; name a path you can write")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({e.strerror}); name a path you can write") \
            from None
