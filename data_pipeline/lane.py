"""One lane's pipeline: claim work, read, shuffle, tokenize, pack, blend, batch.

Everything a lane does is a function of its state dict, so a batch can carry the
state right after it and a checkpoint is just the state of the last batch taken.
"""

from dataclasses import dataclass
from typing import Iterator

import numpy
from tokenizers import Tokenizer

from .errors import DataError
from .masked_lm import MaskedLM
from .sources import Source, read_documents
from .span_corruption import SpanCorruption
from .work import TOKEN_TYPE, advance, held_out, merge, next_claim, shard_of_visit, shuffle_draw

Document = str | numpy.ndarray  # a text, or a view of a tokenized corpus's tokens


@dataclass(frozen=True)
class Plan:
    """What every lane of every rank agrees on; pickled into the worker processes."""

    sources: tuple[Source, ...]
    tokenizer_json: str
    eod: int
    pad: int
    seq_len: int
    shuffle_buffer: int
    epochs: int | None
    seed: int
    span_corruption: SpanCorruption | None = None  # T5: corrupt each window into inputs and targets
    masked_lm: MaskedLM | None = None  # BERT: mask each window, the labels its chosen tokens
    holdout: float = 0.0  # the fraction of documents held out for validation (data_pipeline/work.py's held_out)
    validation: bool = False  # read only the held-out documents (else only the others)

    def reads(self, shard_name: str, index: int) -> bool:
        return not self.holdout or held_out(shard_name, index, self.holdout) == self.validation

    @property
    def window(self) -> int:
        """Tokens per packed window: seq_len + 1 for next-token prediction (inputs and their shifted targets),
        seq_len under masked language modelling (the labels are the window's own tokens), or what span
        corruption needs."""
        if self.span_corruption:
            return self.span_corruption.raw_length
        return self.seq_len if self.masked_lm else self.seq_len + 1

    def visit_limit(self, source_index: int) -> int | None:
        return None if self.epochs is None else self.epochs * len(self.sources[source_index].shards)


class SourceStream:
    """One source on one lane: yields packed windows of `plan.window` tokens."""

    def __init__(self, plan: Plan, source_index: int, cursor: dict, tokenizer: Tokenizer):
        self.plan, self.source_index, self.tokenizer = plan, source_index, tokenizer
        self.source = plan.sources[source_index]
        self.pending = [list(item) for item in cursor["pending"]]
        self.claim = list(cursor["claim"])
        self.reading = cursor["reading"] and [cursor["reading"][0], [list(r) for r in cursor["reading"][1]]]
        self.reader, self.found = None, False
        self.shuffle_key, self.draws = cursor["shuffle"]
        self.carry, self.carry_start = numpy.frombuffer(cursor["carry"], dtype=TOKEN_TYPE), 0
        self.carry_epochs = [list(run) for run in cursor["carry_epochs"]]  # runs over carry[carry_start:]
        self.buffer_ids = [tuple(doc_id) for doc_id in cursor["buffer"]]  # parallel lists: ids are the state,
        self.buffer_documents = self.reread(self.buffer_ids)  # documents are re-read on restore
        self.buffer_snapshot = None  # tuple(buffer_ids), rebuilt only after the buffer changes
        self.fruitless_shards: set[int] = set()

    def state(self) -> dict:
        return {
            "pending": [[visit, [list(r) for r in ranges]] for visit, ranges in self.pending],
            "claim": list(self.claim),
            "reading": self.reading and [self.reading[0], [list(r) for r in self.reading[1]]],
            "buffer": self.buffer_ids_snapshot(),
            "shuffle": [self.shuffle_key, self.draws],
            "carry": self.carry[self.carry_start:].tobytes(),
            "carry_epochs": [list(run) for run in self.carry_epochs],  # copies: the runs change as windows are cut
        }

    def buffer_ids_snapshot(self) -> tuple:
        """A batch spans a fraction of a document, so most batches reuse the previous snapshot."""
        if self.buffer_snapshot is None:
            self.buffer_snapshot = tuple(self.buffer_ids)
        return self.buffer_snapshot

    def shard(self, visit: int):
        return self.source.shards[shard_of_visit(self.plan.seed, self.source_index, len(self.source.shards), visit)]

    def read(self, visit: int, ranges: list) -> Iterator[tuple[int, Document]]:
        """The documents of one work item, reading the shard once from its first wanted record."""
        wanted = merge(ranges)
        for index, document in read_documents(self.shard(visit), start=wanted[0][0]):
            wanted = advance(wanted, index)
            if not wanted:
                return
            if index >= wanted[0][0]:
                yield index, document

    def reread(self, doc_ids: list[tuple[int, int]]) -> list[Document]:
        """Refills a restored shuffle buffer; checkpoints hold document ids, not documents, to stay small."""
        documents = {}
        for visit in sorted({visit for visit, _ in doc_ids}):
            indices = [[index, index + 1] for v, index in doc_ids if v == visit]
            documents.update(((visit, index), document) for index, document in self.read(visit, indices))
        return [documents[doc_id] for doc_id in doc_ids]

    def next_work(self) -> list | None:
        if self.pending:
            return self.pending.pop(0)
        limit = self.plan.visit_limit(self.source_index)
        visit = next_claim(self.claim)
        if limit is not None and visit >= limit:
            return None
        self.claim[3] += 1
        return [visit, [[0, None]]]

    def next_read(self) -> tuple[tuple[int, int], Document] | None:
        while True:
            if self.reader is None:
                self.reading = self.reading or self.next_work()
                if self.reading is None:
                    return None
                self.reader, self.found = self.read(*self.reading), False
            item = next(self.reader, None)
            if item is None:
                self.check_not_all_empty()
                self.reading = self.reader = None
                continue
            index, document = item
            self.found = True
            self.reading[1] = advance(self.reading[1], index + 1)
            if self.plan.reads(self.shard(self.reading[0]).path.name, index):
                return (self.reading[0], index), document

    def check_not_all_empty(self) -> None:
        """Without this, a source whose records all have empty text would be read forever: a hang."""
        if not self.found and self.reading[1] == [[0, None]]:  # a whole shard, not a leftover range
            self.fruitless_shards.add(shard_of_visit(self.plan.seed, self.source_index, len(self.source.shards), self.reading[0]))
            if len(self.fruitless_shards) == len(self.source.shards):
                raise DataError(f"{self.source.name}: every document in this source is empty; remove it from data.sources")

    def next_document(self) -> tuple[int, Document] | None:
        """A seeded shuffle buffer: fill to capacity, then emit a random element, with its epoch."""
        self.buffer_snapshot = None
        while len(self.buffer_ids) < self.plan.shuffle_buffer and (doc := self.next_read()) is not None:
            self.buffer_ids.append(doc[0])
            self.buffer_documents.append(doc[1])
        if not self.buffer_ids:
            return None
        pick = shuffle_draw(self.shuffle_key, self.draws, len(self.buffer_ids))
        self.draws += 1
        for items in (self.buffer_ids, self.buffer_documents):  # swap the pick to the end, where popping is O(1)
            items[pick], items[-1] = items[-1], items[pick]
        visit, _ = self.buffer_ids.pop()
        return visit // len(self.source.shards), self.buffer_documents.pop()

    def next_window(self) -> tuple[numpy.ndarray, int] | None:
        """Documents joined by end-of-document, cut with no padding; a document's rest carries over.
        Comes with the epoch of its first token.

        Only the very last window of a finite run is padded, so no token is ever dropped.
        """
        size = self.plan.window
        while len(self.carry) - self.carry_start < size and (read := self.next_document()) is not None:
            epoch, document = read
            document = self.tokens(document)
            self.carry, self.carry_start = numpy.concatenate([self.carry[self.carry_start:], document]), 0
            if self.carry_epochs and self.carry_epochs[-1][1] == epoch:
                self.carry_epochs[-1][0] += len(document)
            else:
                self.carry_epochs.append([len(document), epoch])
        window = self.carry[self.carry_start:self.carry_start + size]
        if not len(window):
            return None
        self.carry_start += len(window)
        epoch = self.carry_epochs[0][1]
        self.drop_carry_epochs(len(window))
        if len(window) < size:
            window = numpy.pad(window, (0, size - len(window)), constant_values=self.plan.pad)
        return window, epoch

    def tokens(self, document: Document) -> numpy.ndarray:
        """A document's tokens, ending with end-of-document: a text is tokenized here; a tokenized corpus's
        documents end with it already when written by `parallax tokenize` (or Megatron's --append-eod)."""
        if isinstance(document, str):
            return numpy.array(self.tokenizer.encode(document).ids + [self.plan.eod], dtype=TOKEN_TYPE)
        if document[-1] == self.plan.eod:
            return document.astype(TOKEN_TYPE)
        return numpy.append(document.astype(TOKEN_TYPE), TOKEN_TYPE(self.plan.eod))

    def drop_carry_epochs(self, tokens: int) -> None:
        """Forget the epochs of the first `tokens` carried tokens, which a window has taken."""
        while tokens:
            run = self.carry_epochs[0]
            taken = min(tokens, run[0])
            run[0] -= taken
            tokens -= taken
            if not run[0]:
                self.carry_epochs.pop(0)


class Lane:
    """Blends the sources of one lane window by window with a deterministic weighted schedule.

    Each window goes to the source furthest behind its share (largest
    weight * windows_so_far - its_windows), which keeps every prefix of the
    output within one window per source of the configured mix.
    """

    def __init__(self, plan: Plan, state: dict):
        tokenizer = Tokenizer.from_str(plan.tokenizer_json)
        self.plan = plan
        self.streams = [SourceStream(plan, i, cursor, tokenizer) for i, cursor in enumerate(state["sources"])]
        self.weights = [source.weight for source in plan.sources]
        self.emitted = list(state["emitted"])
        self.active = [True] * len(self.streams)

    def state(self) -> dict:
        return {"sources": [stream.state() for stream in self.streams], "emitted": list(self.emitted)}

    def next_window(self) -> tuple[numpy.ndarray, int] | None:
        """The next window of the blend, with the epoch it was read in (data_pipeline/work.py)."""
        while any(self.active):
            total = sum(w for w, on in zip(self.weights, self.active) if on)
            made = sum(self.emitted) + 1
            choice = max(
                (i for i, on in enumerate(self.active) if on),
                key=lambda i: self.weights[i] / total * made - self.emitted[i],
            )
            window = self.streams[choice].next_window()
            if window is not None:
                self.emitted[choice] += 1
                return window
            self.active[choice] = False
        return None

    def batches(self, micro_batch_size: int) -> Iterator[tuple[numpy.ndarray | dict[str, numpy.ndarray], dict]]:
        """Each batch comes with the lane state right after it; a finite run's last batch is padded with pad rows.

        Batches are numpy arrays (a dict of them under span corruption and masked language modelling):
        they cross the worker boundary as one plain copy, where a torch tensor would each time be moved
        into a new shared-memory segment. Span corruption and masking run here, in the workers, off the
        training loop's path.
        """
        pad_row = numpy.full(self.plan.window, self.plan.pad, dtype=TOKEN_TYPE)
        while windows := [w for w in (self.next_window() for _ in range(micro_batch_size)) if w is not None]:
            rows, epochs = [tokens for tokens, _ in windows], [epoch for _, epoch in windows]
            real = len(rows)
            rows += [pad_row] * (micro_batch_size - real)
            if self.plan.span_corruption:
                yield self.plan.span_corruption.batch(rows, real), self.state()
            elif self.plan.masked_lm:
                yield self.plan.masked_lm.batch(rows, epochs, real), self.state()
            else:
                yield numpy.stack(rows).astype(numpy.int64), self.state()
