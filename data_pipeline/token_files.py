"""Megatron's memory-mapped token corpora, PREFIX.bin and PREFIX.idx, read and written.

The format is megatron-core's `indexed_dataset` (version 1), the one Megatron-LM, Megatron-DeepSpeed and
GPT-NeoX corpora are stored in. The .bin holds every token back to back; the .idx holds a 9-byte magic, the
version, the token dtype's code, the sequence and document counts, then each sequence's length (int32) and byte
offset (int64) and the sequence index where each document ends (int64, starting with 0). Opening one reads the
34-byte header and maps the rest: nothing is scanned, so a billion-token corpus opens as fast as a small one.

Read and written here rather than through megatron-core because importing megatron.core costs ~5 s, which every
DataLoader worker and every `parallax tokenize` process would pay for a format of five fields;
tests/data/test_tokenize.py proves the bytes equal megatron-core's writer's and its reader reads ours.

Beside the pair, PREFIX.meta.json records what `parallax tokenize` knew: the tokenizer's fingerprint, the
document and token counts, the largest id. A corpus written elsewhere has none.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 8: numpy.uint16}
CODE_OF_DTYPE = {numpy.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}


def bin_path(prefix: Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: Path) -> Path:
    return Path(f"{prefix}.idx")


def meta_path(prefix: Path) -> Path:
    return Path(f"{prefix}.meta.json")


def dtype_for(vocab_size: int) -> numpy.dtype:
    """The narrowest of Megatron's two token dtypes that holds every id: uint16 halves the corpus."""
    return numpy.dtype(numpy.uint16 if vocab_size <= 2**16 else numpy.int32)


def id_capacity(dtype: numpy.dtype) -> int:
    """How many distinct non-negative ids a dtype stores."""
    return int(numpy.iinfo(dtype).max) + 1


@dataclass(frozen=True)
class CorpusMeta:
    """What `parallax tokenize` records beside the pair (PREFIX.meta.json)."""

    tokenizer_fingerprint: str
    documents: int
    tokens: int
    largest_id: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"


class TokenFile:
    """One corpus, mapped: `document(d)` is a view of document d's tokens, `documents` how many there are."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
        index, data = idx_path(self.prefix), bin_path(self.prefix)
        for path in (index, data):
            if not path.is_file():
                raise DataError(f"{path}: missing; a tokenized source needs both PREFIX.bin and PREFIX.idx (write them "
                                "with `parallax tokenize`), and data.sources[].path is PREFIX, without the extension")
        self.dtype, sequences, documents = read_header(index)
        needed = HEADER_BYTES + sequences * (4 + 8) + documents * 8
        if index.stat().st_size < needed:
            raise DataError(f"{index}: truncated ({index.stat().st_size:,} bytes, its header promises {needed:,}); "
                            "write the corpus again with `parallax tokenize`")
        mapped = numpy.memmap(index, mode="r")
        self.sequence_lengths = numpy.frombuffer(mapped, numpy.int32, sequences, HEADER_BYTES)
        self.sequence_pointers = numpy.frombuffer(mapped, numpy.int64, sequences, HEADER_BYTES + 4 * sequences)
        self.document_indices = numpy.frombuffer(mapped, numpy.int64, documents, HEADER_BYTES + 12 * sequences)
        self.documents = max(0, documents - 1)
        expected = self.token_count * self.dtype.itemsize
        actual = data.stat().st_size
        if actual < expected:
            raise DataError(f"{data}: {actual:,} bytes, shorter than the {expected:,} its index {index.name} says; "
                            "the copy is incomplete: copy or write the corpus again")
        # a plain array over the mapping: slicing a numpy.memmap costs a subclass's bookkeeping per document
        self.tokens = numpy.memmap(data, dtype=self.dtype, mode="r").view(numpy.ndarray) if expected \
            else numpy.zeros(0, self.dtype)

    @property
    def token_count(self) -> int:
        """The end of the last sequence, in tokens: offsets are in bytes."""
        if not len(self.sequence_lengths):
            return 0
        return int(self.sequence_pointers[-1]) // self.dtype.itemsize + int(self.sequence_lengths[-1])

    def document_spans(self, first: int, stop: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(start, stop) token offsets of documents first..stop-1, in one vectorised pass: a document is the run
        of its sequences (one, unless the corpus was split into sentences), which lie back to back."""
        first_sequence = self.document_indices[first:stop]
        end_sequence = self.document_indices[first + 1:stop + 1]
        itemsize = self.dtype.itemsize
        starts = self.sequence_pointers[numpy.minimum(first_sequence, len(self.sequence_pointers) - 1)] // itemsize
        last = numpy.maximum(end_sequence - 1, 0)
        ends = self.sequence_pointers[last] // itemsize + self.sequence_lengths[last]
        return starts, numpy.where(end_sequence > first_sequence, ends, starts)

    def largest_id(self, chunk: int = 1 << 26) -> int:
        """The largest token id, by a scan: only for corpora with no PREFIX.meta.json to say it."""
        largest = -1
        for start in range(0, self.token_count, chunk):
            largest = max(largest, int(self.tokens[start:start + chunk].max()))
        return largest


def read_header(index: Path) -> tuple[numpy.dtype, int, int]:
    with open(index, "rb") as stream:
        header = stream.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:len(MAGIC)] != MAGIC:
        raise DataError(f"{index}: not a Megatron token index (no MMIDIDX header); point data.sources[].path at the "
                        "prefix of a .bin/.idx pair written by `parallax tokenize` or Megatron's preprocessing")
    version, code, sequences, documents = struct.unpack("<QBQQ", header[len(MAGIC):])
    if version != VERSION or code not in DTYPE_CODES:
        raise DataError(f"{index}: Megatron token index version {version} with dtype code {code}; this reader knows "
                        f"version {VERSION} with integer dtypes {sorted(DTYPE_CODES)}")
    return numpy.dtype(DTYPE_CODES[code]), sequences, documents


def read_meta(prefix: Path) -> CorpusMeta | None:
    path = meta_path(prefix)
    if not path.is_file():
        return None
    try:
        return CorpusMeta(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise DataError(f"{path}: unreadable ({' '.join(str(error).split())}); write the corpus again with "
                        "`parallax tokenize`, or delete the file and set data.tokenizer_check: false") from None


def write_index(path: Path, dtype: numpy.dtype, lengths: numpy.ndarray) -> None:
    """The index of documents of `lengths` tokens lying back to back, one sequence each."""
    pointers = numpy.concatenate([[0], numpy.cumsum(lengths)[:-1]]).astype(numpy.int64) * numpy.dtype(dtype).itemsize
    with open(path, "wb") as out:
        out.write(MAGIC + struct.pack("<QBQQ", VERSION, CODE_OF_DTYPE[numpy.dtype(dtype)], len(lengths), len(lengths) + 1))
        out.write(numpy.asarray(lengths).astype(numpy.int32).tobytes())
        out.write(pointers[:len(lengths)].tobytes())
        out.write(numpy.arange(len(lengths) + 1, dtype=numpy.int64).tobytes())


class TokenFileWriter:
    """Writes a corpus, one sequence per document, under temporary names; `finish` moves it into place.

    An interrupted write leaves no PREFIX.idx, so nothing that looks finished: `finish` deletes an old PREFIX.idx
    first and renames the new one last, after the .bin and the .meta.json it describes.
    """

    def __init__(self, prefix: Path, dtype: numpy.dtype):
        self.prefix, self.dtype = Path(prefix), numpy.dtype(dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.data = open(self.partial(bin_path(self.prefix)), "wb")
        self.lengths: list[int] = []
        self.largest = -1

    @staticmethod
    def partial(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def add_document(self, tokens: numpy.ndarray) -> None:
        tokens = numpy.asarray(tokens)
        if len(tokens):
            self.largest = max(self.largest, int(tokens.max()))
        self.data.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.lengths.append(len(tokens))

    def add_corpus(self, part: TokenFile) -> None:
        """Appends a whole corpus of the same dtype (a worker's part) by copying its bytes."""
        assert part.dtype == self.dtype and numpy.array_equal(part.document_indices, numpy.arange(part.documents + 1))
        self.data.write(part.tokens[:part.token_count].tobytes())
        self.lengths.extend(part.sequence_lengths.tolist())

    def finish(self, tokenizer_fingerprint: str, largest_id: int | None = None) -> CorpusMeta:
        self.data.close()
        lengths = numpy.asarray(self.lengths, dtype=numpy.int64)
        write_index(self.partial(idx_path(self.prefix)), self.dtype, lengths)
        meta = CorpusMeta(tokenizer_fingerprint, len(lengths), int(lengths.sum()),
                          self.largest if largest_id is None else largest_id)
        self.partial(meta_path(self.prefix)).write_text(meta.to_json(), encoding="utf-8")
        idx_path(self.prefix).unlink(missing_ok=True)
        for final in (bin_path(self.prefix), meta_path(self.prefix), idx_path(self.prefix)):
            os.replace(self.partial(final), final)
        return meta

    def abandon(self) -> None:
        """Removes the partial files of a write that will not finish."""
        self.data.close()
        for final in (bin_path(self.prefix), meta_path(self.prefix), idx_path(self.prefix)):
            self.partial(final).unlink(missing_ok=True)
