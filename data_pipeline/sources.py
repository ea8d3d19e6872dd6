"""Finding shard files and streaming their documents through Hugging Face `datasets`.

Every file is one shard. Problems are turned into a one-line `DataError` naming
the file, because a traceback from deep inside `datasets` or pyarrow tells the
user nothing about which of their thousands of files is broken.
"""

import json
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a training job must never reach for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402  (must see the offline switches above)
import pyarrow  # noqa: E402
import pyarrow.parquet  # noqa: E402

from tokenizers import Tokenizer  # noqa: E402

from .config import SourceConfig  # noqa: E402
from .errors import DataError  # noqa: E402
from .token_files import TokenFile, bin_path, id_capacity, idx_path, meta_path, read_meta  # noqa: E402

datasets.disable_progress_bars()
datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own error logging would duplicate ours
log = logging.getLogger(__name__)

BUILDERS = {"text": "text", "jsonl": "json", "parquet": "parquet"}
READ_BATCH = 64  # records per Arrow batch: large enough to amortise per-call overhead
TOKENIZED_SHARDS = 1024  # a tokenized corpus is read as this many runs of documents (fewer if it has fewer)


@dataclass(frozen=True)
class Shard:
    """A file, or (format "tokenized") documents first..stop-1 of the token corpus at prefix `path`.

    A tokenized corpus is one pair of files, but lanes share work shard by shard (data_pipeline/work.py):
    cutting it into runs of documents, by its document count alone, lets every lane of any layout read
    its own part. Its documents keep their index in the whole corpus, which is their identity."""

    path: Path
    format: str
    text_field: str
    first: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        return f"{self.path.name}[{self.first}:{self.stop}]" if self.format == "tokenized" else self.path.name


@dataclass(frozen=True)
class Source:
    """A validated corpus: its non-empty shards in sorted order, and the empty files it skipped."""

    name: str
    weight: float
    shards: tuple[Shard, ...]
    skipped_empty: tuple[Path, ...]
    largest_id: int | None = None  # a tokenized corpus's largest token id, which the model's vocabulary must hold


def infer_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def discover(cfg: SourceConfig, field: str = "data.sources", tokenizer: Tokenizer | None = None,
             tokenizer_check: bool = True) -> Source:
    """Lists and checks a source's files up front, so bad paths fail at startup and not hours into a run.

    Policy: empty (0-byte) files are skipped and counted, and dot-files and
    dot-directories (.git, editor droppings) are not data; everything else that is
    wrong is an error. A text file is one document; JSON Lines and Parquet hold one
    document per record. Content errors (bad UTF-8, malformed JSON) can only be seen
    while reading and are raised then. A tokenized source is checked against `tokenizer`
    (discover_tokenized).
    """
    if cfg.format == "tokenized":
        if tokenizer is None:
            raise DataError(f"{cfg.path}: a tokenized corpus holds no text to train a tokenizer on; give text sources")
        return discover_tokenized(cfg, field, tokenizer, tokenizer_check)
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


def discover_tokenized(cfg: SourceConfig, field: str, tokenizer: Tokenizer, tokenizer_check: bool) -> Source:
    """Opens a .bin/.idx pair by its index alone and refuses, at start-up, what would go wrong later: ids its
    dtype cannot hold, ids of another tokenizer (its PREFIX.meta.json names the one it was made with), a .bin
    shorter than its index. The largest id comes from the meta file; a corpus made elsewhere is scanned once."""
    from .tokenizer import fingerprint  # here: tokenizer.py reads text sources with this module

    prefix = cfg.path.expanduser()
    corpus = open_token_file(prefix)
    vocabulary = tokenizer.get_vocab_size()
    if id_capacity(corpus.dtype) < vocabulary:
        raise DataError(f"{idx_path(prefix)}: stores {corpus.dtype} ids, up to {id_capacity(corpus.dtype) - 1}, but "
                        f"the tokenizer has {vocabulary} tokens; tokenize it again with `parallax tokenize`")
    meta = read_meta(prefix)
    if tokenizer_check:
        own = fingerprint(tokenizer.to_str())
        if meta is None:
            raise DataError(f"{meta_path(prefix)}: missing, so nothing says which tokenizer made {bin_path(prefix)}; "
                            "set data.tokenizer_check: false for a corpus made elsewhere with data.tokenizer")
        if meta.tokenizer_fingerprint != own:
            raise DataError(f"{bin_path(prefix)}: tokenized with tokenizer {meta.tokenizer_fingerprint}, not with "
                            f"data.tokenizer ({own}); tokenize it again with `parallax tokenize --tokenizer`, or set "
                            "data.tokenizer_check: false if both give every token the same id")
    if not corpus.documents:
        raise DataError(f"{idx_path(prefix)}: the corpus has no documents; remove it from {field}")
    per_shard = math.ceil(corpus.documents / TOKENIZED_SHARDS)
    shards = tuple(Shard(prefix, "tokenized", cfg.text_field, first, min(first + per_shard, corpus.documents))
                   for first in range(0, corpus.documents, per_shard))
    largest = meta.largest_id if meta is not None and meta.documents == corpus.documents else corpus.largest_id()
    return Source(str(prefix), cfg.weight, shards, (), largest)


@lru_cache(maxsize=None)
def open_token_file(prefix: Path) -> TokenFile:
    """One mapping per corpus and process: every shard of a corpus reads the same pair."""
    return TokenFile(prefix)


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
    on what the pipeline chose to skip. A tokenized shard yields views of its tokens
    (read_tokenized).
    """
    if shard.format == "tokenized":
        yield from read_tokenized(shard, start)
        return
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


def read_tokenized(shard: Shard, start: int) -> Iterator[tuple[int, numpy.ndarray]]:
    """(index in the corpus, its tokens as a view of the mapping) from document max(first, start) on: no copy,
    no Python object but the view per document."""
    corpus = open_token_file(shard.path)
    first = max(shard.first, start)
    starts, ends = corpus.document_spans(first, shard.stop)
    for index, begin, end in zip(range(first, shard.stop), starts.tolist(), ends.tolist()):
        if end > begin:
            yield index, corpus.tokens[begin:end]


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
