"""`parallax tokenize`: text sources turned, once and offline, into a Megatron token corpus (PREFIX.bin/.idx).

Every document becomes `encode(text).ids + [eod]`, the tokens the streaming pipeline makes of it (lane.py) and
Megatron-LM's preprocessing makes with --append-eod, so either trainer reads the corpus by mmap instead of
tokenizing on every run.

The output depends only on the sources and the tokenizer, never on the worker count: the unit of work is one
shard file, tokenized whole by one worker into its own part corpus, and the parts are appended in shard order
(sources as given, shards in `discover` order, records in file order, empty documents skipped).

An interrupted run leaves no new PREFIX.idx and no temporary files; a finished corpus already at PREFIX stays
whole, because TokenFileWriter writes under `.partial` names and only `finish` replaces the old files.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy
from tokenizers import Tokenizer

from .config import DataConfig, SourceConfig
from .errors import DataError
from .sources import Shard, discover, read_documents
from .token_files import CorpusMeta, TokenFile, TokenFileWriter, dtype_for
from .tokenizer import fingerprint, load_tokenizer


@dataclass(frozen=True)
class Progress:
    """How far a run is, after each shard tokenized: what a progress line shows."""

    documents: int
    tokens: int
    shards_done: int
    shards_total: int
    seconds: float
    workers: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Encoding:
    """What every worker needs to turn a shard into tokens; forked into each worker once, not sent per shard."""

    tokenizer: Tokenizer
    eod: int
    dtype: numpy.dtype
    fingerprint: str


def tokenize_corpus(sources: Iterable[Path | str | SourceConfig], prefix: Path, tokenizer_cfg: DataConfig,
                    workers: int | None = None, progress: Callable[[Progress], None] | None = None) -> CorpusMeta:
    """Writes PREFIX.bin/.idx/.meta.json from `sources` with the tokenizer and eod token of `tokenizer_cfg`.

    `workers` processes each tokenize one shard at a time (default: one per CPU, at most one per shard);
    `progress` is called as each shard is tokenized.
    """
    configs = [s if isinstance(s, SourceConfig) else SourceConfig(path=Path(s)) for s in sources]
    shards = [shard for cfg in configs for shard in discover(cfg, field="SOURCES").shards]
    tokenizer = load_tokenizer(tokenizer_cfg)
    encoding = Encoding(tokenizer, tokenizer.token_to_id(tokenizer_cfg.eod_token),
                        dtype_for(tokenizer.get_vocab_size()), fingerprint(tokenizer.to_str()))
    workers = min(len(os.sched_getaffinity(0)), len(shards)) if workers is None else workers
    prefix = Path(prefix)
    writer = TokenFileWriter(prefix, encoding.dtype)
    parts_dir = Path(tempfile.mkdtemp(prefix=f".{prefix.name}.parts-", dir=prefix.parent))
    start, tally, largest = time.perf_counter(), Progress(0, 0, 0, len(shards), 0.0, workers), -1

    def shard_done(part: CorpusMeta) -> None:
        """Counts a shard as soon as it is tokenized, whether or not the shards before it are yet."""
        nonlocal tally
        tally = replace(tally, documents=tally.documents + part.documents, tokens=tally.tokens + part.tokens,
                        shards_done=tally.shards_done + 1, seconds=time.perf_counter() - start)
        if progress:
            progress(tally)

    try:
        # closing: a failure here must stop the workers before their directory is removed
        with closing(tokenized_parts(shards, parts_dir, encoding, workers, shard_done)) as parts:
            for part_prefix, part in parts:
                writer.add_corpus(TokenFile(part_prefix))
                largest = max(largest, part.largest_id)
                remove_corpus(part_prefix)  # the disk holds the unappended parts, not a second copy of the corpus
        return writer.finish(encoding.fingerprint, largest)
    except BaseException:  # Ctrl-C too: nothing half-written may stay
        writer.abandon()
        raise
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)


def tokenized_parts(shards: list[Shard], parts_dir: Path, encoding: Encoding, workers: int,
                    shard_done: Callable[[CorpusMeta], None]) -> Iterator[tuple[Path, CorpusMeta]]:
    """Each shard's part corpus, in shard order, as soon as it and all before it are written; `shard_done` hears
    of each part as soon as it alone is."""
    tasks = [(index, shard, parts_dir / f"part-{index:06d}") for index, shard in enumerate(shards)]
    if workers == 1:  # in-process: no slower than one forked worker (1.65-1.71 s against 1.71-1.75 s, built-in corpus)
        _start_worker(encoding, forked=False)
        parts = (tokenize_shard(task) for task in tasks)
    else:
        # Largest first, so the last shards handed out are small and no worker is left with a big one while the
        # others idle; the parts are still appended in shard order. It matters where shard sizes differ: on the
        # built-in corpus's even shards 2 workers make 1.66-1.75x one worker's tokens/s with or without it.
        parts = forked_workers(sorted(tasks, key=lambda task: task[1].path.stat().st_size, reverse=True),
                               encoding, workers)
    finished: dict[int, tuple[Path, CorpusMeta]] = {}
    next_index = 0
    with closing(parts):  # stops the workers now, not when the garbage collector gets to them, on any exit
        for index, part_prefix, meta in parts:
            shard_done(meta)
            finished[index] = (part_prefix, meta)
            while next_index in finished:
                yield finished.pop(next_index)
                next_index += 1


def forked_workers(tasks: list[tuple[int, Shard, Path]], encoding: Encoding,
                   workers: int) -> Iterator[tuple[int, Path, CorpusMeta]]:
    """`tokenize_shard` of every task, in the order they finish, from forked workers handed one task at a time.

    Each worker has its own pipe and nothing else is shared, so stopping them early is a SIGKILL that cannot
    hang, and a worker that dies is an error naming its shard. multiprocessing.Pool did neither: its terminate
    can wait for ever on queue locks (a CI run hung there), and it replaces a worker the OOM killer takes while
    that worker's shard is lost, so the run waits for ever. Workers are forked (the tokenizer is not pickled)
    and ignore SIGINT, so Ctrl-C reaches only the parent, which stops them, instead of each printing its own
    traceback.
    """
    fork = multiprocessing.get_context("fork")
    pending = iter(tasks)
    processes: dict[Connection, multiprocessing.Process] = {}
    handed: dict[Connection, tuple[int, Shard, Path]] = {}  # each worker's task in hand
    try:
        for _ in range(min(workers, len(tasks))):
            parent_end, child_end = fork.Pipe()
            process = fork.Process(target=_serve, args=(child_end, encoding), daemon=True)
            process.start()
            child_end.close()  # so the parent sees EOF, not silence, if the worker dies
            processes[parent_end] = process
            handed[parent_end] = next(pending)
            parent_end.send(handed[parent_end])
        busy = set(processes)
        while busy:
            for connection in wait(busy):
                try:
                    outcome = connection.recv()
                    if not isinstance(outcome, BaseException):
                        handed[connection] = next(pending, None)
                        connection.send(handed[connection])  # before the yield: it goes on while its part is appended
                except (EOFError, ConnectionError):  # its end of the pipe closed or reset
                    processes[connection].join(timeout=5)
                    task = handed[connection]
                    reading = f"{task[1].path}: the tokenize worker reading it" if task else "a tokenize worker"
                    raise DataError(f"{reading} died (exit code {processes[connection].exitcode}); rerun, with "
                                    "fewer --workers if memory is short") from None
                if isinstance(outcome, BaseException):
                    raise outcome
                if handed[connection] is None:
                    busy.discard(connection)
                yield outcome
    finally:
        for connection, process in processes.items():
            process.kill()
            process.join()
            connection.close()


def _serve(connection: Connection, encoding: Encoding) -> None:
    """A worker's loop: tokenize each task sent until None; a failure is sent back, to be raised by the parent."""
    _start_worker(encoding, forked=True)
    while (task := connection.recv()) is not None:
        try:
            connection.send(tokenize_shard(task))
        except Exception as error:
            connection.send(error)
            return


_encoding: Encoding | None = None  # the worker's tokenizer, set once per worker process by _start_worker


def _start_worker(encoding: Encoding, forked: bool) -> None:
    """In a forked worker, TOKENIZERS_PARALLELISM=false keeps it to one thread, so N workers use N cores and
    the comparison of worker counts measures the workers, not Hugging Face's own thread pool; the parent's
    signal handlers are undone, so only the parent reacts to Ctrl-C and SIGTERM ends a worker."""
    global _encoding
    if forked:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _encoding = encoding


def tokenize_shard(task: tuple[int, Shard, Path]) -> tuple[int, Path, CorpusMeta]:
    """Reads and tokenizes one whole shard file into the part corpus `part_prefix`."""
    index, shard, part_prefix = task
    writer = TokenFileWriter(part_prefix, _encoding.dtype)
    try:
        for _, text in read_documents(shard):
            writer.add_document(numpy.array(_encoding.tokenizer.encode(text).ids + [_encoding.eod]))
        return index, part_prefix, writer.finish(_encoding.fingerprint)
    except BaseException:
        writer.abandon()
        raise


def remove_corpus(prefix: Path) -> None:
    for suffix in (".bin", ".idx", ".meta.json"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
