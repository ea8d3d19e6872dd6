"""The built-in corpus: real text that exists on every machine, the Python standard library's source.

It lets the demo and the tests train on something meaningful with no download
and no data setup, and it is the same on every node of a cluster that runs the
same Python.
"""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from .cache import build_once

if TYPE_CHECKING:  # imported where it is built: the CLI reads this module's defaults, without pydantic
    from .config import SourceConfig

DEFAULT_MAX_BYTES = 8_000_000  # ~2M tokens: more than the demo consumes, BPE-trainable in seconds
DEFAULT_NUM_SHARDS = 16


def stdlib_sources() -> list[Path]:
    """Sorted so that the same Python installation always yields the same corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "__pycache__"} & set(path.relative_to(root).parts)
    )


def prepare_data(out_dir: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, num_shards: int = DEFAULT_NUM_SHARDS) -> list[Path]:
    """Writes a spread-out, deterministic sample of stdlib source files as JSON Lines shards.

    Taking every k-th file (rather than the first files alphabetically) keeps the
    sample as varied as the whole library. Files that are not UTF-8 (a few
    encoding tests) are left out. One top-level definition is one document, not
    one file: the shuffle buffer mixes documents, and a whole module would fill a
    batch with consecutive windows of itself.
    """
    files = stdlib_sources()
    stride = max(1, round(sum(f.stat().st_size for f in files) / max_bytes))
    root = Path(sysconfig.get_paths()["stdlib"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [out_dir / f"stdlib-{i:05d}.jsonl" for i in range(num_shards)]
    outputs = [open(shard, "w", encoding="utf-8") for shard in shards]
    written = 0
    try:
        for file in files[::stride]:
            try:
                text = file.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            for line, unit in top_level_units(text):
                record = {"text": unit, "id": f"{file.relative_to(root)}:{line}"}
                outputs[written % num_shards].write(json.dumps(record) + "\n")
                written += 1
            if sum(out.tell() for out in outputs) >= max_bytes:
                break
    finally:
        for out in outputs:
            out.close()
    return shards


def top_level_units(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each top-level def or class with its decorators; a module's
    preamble (docstring, imports, constants) is a unit too."""
    lines = text.splitlines(keepends=True)
    units, start = [], 0
    for i, line in enumerate(lines):
        opens_definition = line.startswith(("def ", "async def ", "class ", "@"))
        if opens_definition and i > start and not lines[i - 1].startswith("@"):
            units.append((start + 1, "".join(lines[start:i])))
            start = i
    units.append((start + 1, "".join(lines[start:])))
    return [(line, unit) for line, unit in units if unit.strip()]


def builtin_corpus(cache_dir: Path) -> SourceConfig:
    """The cached default corpus, built on first use; named by Python version since its text differs."""
    from .config import SourceConfig

    name = f"stdlib-corpus-py{sys.version_info.major}.{sys.version_info.minor}-v2"
    return SourceConfig(path=build_once(Path(cache_dir) / name, prepare_data), format="jsonl")
