"""Finding shard files and streaming their documents through Hugging Face `datasets`.

Every file is one shard. Problems are turned into a one-line `DataError` naming
the file, because a traceback from deep inside `datasets` or pyarrow tells the
user nothing about which of their thousands of files is broken.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a training job must never reach for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402  (must see the offline switches above)
import pyarrow  # noqa: E402
import pyarrow.parquet  # noqa: E402

from .config import SourceConfig  # noqa: E402
from .errors import DataError  # noqa: E402

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error logging would duplicate ours
log = logging.getLogger(__name__)

BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
READ_BATCH = 64  # records per Arrow batch: large enough to amortise per-call overhead


@dataclass(frozen=True)
class Shard:
    path: Path
    format: str
    text_field: str


@dataclass(frozen=True)
class Source:
    """A validated corpus: its non-empty shards in sorted order, and the empty files it skipped."""

    name: str
    weight: float
    shards: tuple[Shard, ...]
    skipped_empty: tuple[Path, ...]


def infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def discover(cfg: SourceConfig, field: str = "data.sources") -> Source:
    """Lists and checks a source's files up front, so bad paths fail at startup and not hours into a run.

    Policy: empty (0-byte) files are skipped and counted, and dot-files and
    dot-directories (.git, editor droppings) are not data; everything else that is
    wrong is an error. A text file is one document; JSON Lines and Parquet hold one
    document per record. Content errors (bad UTF-8, malformed JSON) can only be seen
    while reading and are raised then.
    """
    root = cfg.path.expanduser()
    if not root.exists():
        raise DataError(f"{root}: data source path does not exist; fix {field}[].path")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    empty = tuple(f for f in files if f.stat().st_size == 0)
    shards = tuple(Shard(f, cfg.format or infer_format(f), cfg.text_field) for f in files if f.stat().st_size > 0)
    if not shards:
        raise DataError(f"{root}: no non-empty data files found; point {field}[].path at text, .jsonl or .parquet files")
    if empty:
        log.warning("%s: skipped %d empty file(s), e.g. %s", root, len(empty), empty[0])
    for shard in shards:
        if shard.format == "parquet":
            check_parquet(shard)
    return Source(str(root), cfg.weight, shards, empty)


def check_parquet(shard: Shard) -> None:
    """Reads only the footer, so checking thousands of shards stays cheap."""
    try:
        schema = pyarrow.parquet.read_schema(shard.path)
    except pyarrow.ArrowException as error:
        raise DataError(f"{shard.path}: not a readable Parquet file ({one_line(error)}); fix or remove it") from None
    if shard.text_field not in schema.names:
        raise DataError(
            f"{shard.path}: Parquet file has no column {shard.text_field!r} (columns: {', '.join(schema.names)}); "
            "set data.sources[].text_field to the column holding the text"
        )


def read_documents(shard: Shard, start: int = 0) -> Iterator[tuple[int, str]]:
    """Yields (index within the shard, text) from document `start` on; empty documents are dropped.

    Indices count every record, dropped or not, so a document's id never depends
    on what the pipeline chose to skip.
    """
    kwargs = {"sample_by": "document"} if shard.format == "text" else {}
    if shard.format == "parquet":
        kwargs["columns"] = [shard.text_field]
    try:
        records = datasets.load_dataset(
            BUILDERS[shard.format], data_files=str(shard.path), split="train", streaming=True, **kwargs
        ).skip(start)
        index = start
        # .iter(), unlike plain iteration, does not re-split files among DataLoader workers: we shard ourselves.
        for batch in records.iter(batch_size=READ_BATCH):
            for text in batch.get(shard.text_field) or [None]:
                if not isinstance(text, str):
                    raise DataError(
                        f"{shard.path} record {index + 1}: no string field {shard.text_field!r}; "
                        "fix the record or set data.sources[].text_field"
                    )
                if text:
                    yield index, text
                index += 1
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError, ValueError) as error:  # incl. UnicodeDecodeError
        raise DataError(f"{shard.path}: {diagnose(shard, error)}") from None


def diagnose(shard: Shard, error: Exception) -> str:
    """Finds the offending line ourselves: pyarrow reports rows within a chunk, which users cannot locate."""
    if shard.format == "jsonl":
        with open(shard.path, "rb") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    json.loads(line.decode("utf-8")) if line.strip() else None
                except UnicodeDecodeError:
                    return f"line {number} is not UTF-8; re-encode the file as UTF-8 or remove it"
                except json.JSONDecodeError as bad:
                    return f"line {number} is malformed JSON ({bad.msg}); fix or remove that line"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (bad byte at offset {error.start}); re-encode it as UTF-8 or remove it"
    return f"cannot be read as {shard.format} ({one_line(error)}); fix or remove it"


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())
