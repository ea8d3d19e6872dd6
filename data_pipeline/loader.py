"""The per-rank loader: lanes in background workers, checkpointable and reshardable.

A rank runs one lane per DataLoader worker (one lane in-process when
num_workers is 0). The DataLoader takes chunks of CHUNK batches from its
workers round-robin, and every batch arrives with its lane's state right after
it, so the rank's state is exact without ever asking a worker anything: it is
the state attached to the last batch consumed from each lane, plus which lane
is next and how many batches of its current chunk are still due.
"""

import contextlib
import copy
import ctypes
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from functools import partial
from itertools import islice

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig, SourceConfig
from .corpus import builtin_corpus
from .errors import DataError
from .lane import Lane, Plan
from .masked_lm import MaskedLM
from .sources import Source, discover
from .span_corruption import SpanCorruption
from .tokenizer import NUM_SENTINELS, fingerprint, load_tokenizer
from .work import new_cursor, reshard, tokens_from_bytes, tokens_to_bytes

STATE_VERSION = 1
CHUNK = 8  # batches per hand-off from a worker: each hand-off costs two process wake-ups
PREFETCH = 4  # chunks queued per worker: rides out the training loop's stalls and a busy scheduler


def build_dataloader(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int) -> "PipelineLoader":
    """Every TP peer of a DP rank must pass the same dp_rank/dp_size/seed: it then gets identical batches."""
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be a positive integer, got {micro_batch_size}")
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} for dp_size {dp_size}")
    plan = training_plan(cfg, seed)
    return PipelineLoader(plan, micro_batch_size, dp_rank, dp_size, cfg.num_workers)


def training_plan(cfg: DataConfig, seed: int) -> Plan:
    """The training sources (the built-in corpus by default), less the documents held out for validation."""
    tokenizer = load_tokenizer(cfg)
    return Plan(
        sources=open_sources(cfg.sources or [builtin_corpus(cfg.cache_dir)], "data.sources", cfg, tokenizer),
        tokenizer_json=tokenizer.to_str(),
        eod=tokenizer.token_to_id(cfg.eod_token),
        pad=tokenizer.token_to_id(cfg.pad_token),
        seq_len=cfg.seq_len,
        shuffle_buffer=cfg.shuffle_buffer,
        epochs=cfg.epochs,
        seed=seed,
        span_corruption=span_corruption(cfg, tokenizer, seed),
        masked_lm=MaskedLM.for_run(cfg, tokenizer, seed),
        holdout=cfg.validation_fraction if cfg.validation is None else 0.0,
    )


def open_sources(sources: list[SourceConfig], field: str, cfg: DataConfig, tokenizer: Tokenizer) -> tuple[Source, ...]:
    return tuple(discover(source, field, tokenizer, cfg.tokenizer_check) for source in sources)


def largest_token_ids(cfg: DataConfig) -> list[tuple[str, int]]:
    """(prefix, largest id) of each tokenized corpus the run reads: a model must have a row for every id, which
    the ranks check before building one (RunConfig.check_vocab_size), not when the id comes up mid-run."""
    tokenized = [(source, field) for field, sources in (("data.sources", cfg.sources), ("data.validation", cfg.validation))
                 for source in sources or [] if source.format == "tokenized"]
    if not tokenized:
        return []
    tokenizer = load_tokenizer(cfg)
    opened = [discover(source, field, tokenizer, cfg.tokenizer_check) for source, field in tokenized]
    return [(source.name, source.largest_id) for source in opened]


def span_corruption(cfg: DataConfig, tokenizer, seed: int) -> SpanCorruption | None:
    """T5's objective when data.span_corruption is set; its sentinels are the tokenizer's <extra_id_k> tokens."""
    if cfg.span_corruption is None:
        return None
    sentinels = [tokenizer.token_to_id(f"<extra_id_{k}>") for k in range(NUM_SENTINELS)]
    if None in sentinels:
        raise DataError(f"the tokenizer lacks the sentinel <extra_id_{sentinels.index(None)}> that span corruption "
                        "masks with; train one with `parallax prepare-tokenizer`")
    objective = SpanCorruption(
        inputs_length=cfg.seq_len, noise_density=cfg.span_corruption.noise_density,
        mean_noise_span_length=cfg.span_corruption.mean_noise_span_length, sentinels=tuple(sentinels),
        eod=tokenizer.token_to_id(cfg.eod_token), pad=tokenizer.token_to_id(cfg.pad_token), seed=seed,
    )
    objective.check()
    return objective


class PipelineLoader:
    """Iterator of LongTensor[micro_batch_size, seq_len + 1], or of dicts: under span corruption of input_ids
    [micro_batch_size, seq_len], decoder_input_ids and labels, under masked language modelling of input_ids and
    labels [micro_batch_size, seq_len]; endless unless data.epochs is set."""

    def __init__(self, plan: Plan, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int):
        self.plan, self.micro_batch_size = plan, micro_batch_size
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.lanes_per_rank = max(1, num_workers)
        total = dp_size * self.lanes_per_rank
        self.lane_states = [
            {
                "sources": [new_cursor(plan.seed, s, 0, total, self.global_lane(w)) for s in range(len(plan.sources))],
                "emitted": [0] * len(plan.sources),
            }
            for w in range(self.lanes_per_rank)
        ]
        self.next_lane, self.chunk_left = 0, 0  # chunk_left: batches still due from next_lane's current chunk
        self.data_wait_seconds = 0.0  # cumulative time the training loop blocked in next(); log it
        self.chunks = None
        self.ready = deque()

    def global_lane(self, worker: int) -> int:
        return self.dp_rank * self.lanes_per_rank + worker

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        if not self.ready:
            start = time.perf_counter()
            if self.chunks is None:
                with _sigterm_held():  # starting the workers is waiting too
                    self.chunks = iter(self.torch_loader())
            lane, chunk = next(self.chunks)
            self.data_wait_seconds += time.perf_counter() - start
            if isinstance(chunk, str):
                self.chunks = None  # stop the workers now, not whenever the loader happens to be collected
                raise DataError(chunk)
            self.ready.extend((lane, batch, state) for batch, state in chunk)
        lane, batch, state = self.ready.popleft()
        self.lane_states[lane] = state
        self.next_lane, self.chunk_left = (lane, len(self.ready)) if self.ready else ((lane + 1) % self.lanes_per_rank, 0)
        if isinstance(batch, dict):
            return {name: torch.from_numpy(array) for name, array in batch.items()}
        return torch.from_numpy(batch)

    def torch_loader(self) -> DataLoader:
        dataset = LaneDataset(self.plan, self.lane_states, self.next_lane, self.chunk_left, self.micro_batch_size)
        return DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, collate_fn=as_is,
            prefetch_factor=PREFETCH if self.num_workers else None, worker_init_fn=partial(bind_to_rank, os.getpid()),
        )

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.plan.seed,
            "shards": shard_names(self.plan),
            "tokenizer": fingerprint(self.plan.tokenizer_json),
            "holdout": self.plan.holdout,
            "next_lane": self.next_lane,
            "chunk_left": self.chunk_left,
            "lanes": with_carries_as(tokens_from_bytes, self.lane_states),
        }

    def load_state_dict(self, states: Sequence[dict]) -> None:
        """`states[r]` is the state_dict() of old DP rank r. At the same DP size and worker count a rank
        takes its own and asks for no other (a checkpoint's `states` reads each from its file only when
        asked); a different DP size or worker count reshards them all."""
        own = states[self.dp_rank] if len(states) == self.dp_size else None
        if own is not None:
            self.check_compatible({self.dp_rank: own})
        if own is not None and len(own["lanes"]) == self.lanes_per_rank:
            self.lane_states = with_carries_as(tokens_to_bytes, with_carry_epochs(own["lanes"]))
            self.next_lane, self.chunk_left = own["next_lane"], own["chunk_left"]
        else:
            everyone = dict(enumerate(states))
            self.check_compatible(everyone)
            old_lanes = [lane for state in everyone.values() for lane in with_carry_epochs(state["lanes"])]
            self.lane_states = self.resharded(with_carries_as(tokens_to_bytes, old_lanes))
            self.next_lane, self.chunk_left = 0, 0
        self.chunks, self.ready = None, deque()  # workers restart from the loaded state

    def resharded(self, old_lanes: list[dict]) -> list[dict]:
        total = self.dp_size * self.lanes_per_rank
        per_source = [
            reshard([lane["sources"][s] for lane in old_lanes], total, self.plan.seed, s, self.plan.visit_limit(s))
            for s in range(len(self.plan.sources))
        ]
        return [
            {"sources": [cursors[self.global_lane(w)] for cursors in per_source], "emitted": [0] * len(per_source)}
            for w in range(self.lanes_per_rank)
        ]

    def check_compatible(self, states: dict[int, dict]) -> None:
        """`states` maps old DP ranks to their states. Resuming onto different files or another seed would
        silently break exactly-once, so refuse."""
        if not states or any(s.get("dp_rank") != r for r, s in states.items()):
            raise DataError("load_state_dict needs the data states of every DP rank of the saved run, in rank order")
        if any(s.get("version") != STATE_VERSION for s in states.values()):
            raise DataError(f"data checkpoint has an unknown format version; this code reads version {STATE_VERSION}")
        states = list(states.values())
        if states[0]["shards"] != shard_names(self.plan):
            raise DataError("data.sources lists different files than when the checkpoint was saved; resume with the same files")
        if states[0]["tokenizer"] != fingerprint(self.plan.tokenizer_json):
            raise DataError("data.tokenizer differs from the checkpoint's (its carried-over tokens would be wrong); resume with the same tokenizer")
        if states[0].get("holdout", 0.0) != self.plan.holdout:
            raise DataError(f"the checkpoint held out {states[0].get('holdout', 0.0)} of the documents for validation "
                            f"but this run holds out {self.plan.holdout}; resume with the same data.validation_fraction "
                            "and data.validation")
        if states[0]["seed"] != self.plan.seed:
            raise DataError(f"the checkpoint's data seed is {states[0]['seed']} but this run uses {self.plan.seed}; use the same seed to resume")


class LaneDataset(IterableDataset):
    """Worker w runs lane (first_lane + w): the DataLoader starts at worker 0, the resumed rank at its next lane.

    The first lane first finishes the chunk it was in the middle of (`first_chunk` batches), so a
    resumed rank interleaves its lanes exactly as the uninterrupted one did.
    """

    def __init__(self, plan: Plan, lane_states: list[dict], first_lane: int, first_chunk: int, micro_batch_size: int):
        self.plan, self.lane_states = plan, lane_states
        self.first_lane, self.first_chunk, self.micro_batch_size = first_lane, first_chunk, micro_batch_size

    def __iter__(self):
        worker = get_worker_info()
        worker_id = worker.id if worker else 0
        lane = (self.first_lane + worker_id) % len(self.lane_states)
        size = self.first_chunk if worker_id == 0 and self.first_chunk else CHUNK
        batches = Lane(self.plan, self.lane_states[lane]).batches(self.micro_batch_size)
        try:
            while chunk := list(islice(batches, size)):
                yield lane, chunk
                size = CHUNK
        except DataError as error:  # crossing the process boundary as data keeps it one line, not a traceback
            yield lane, str(error)


def with_carries_as(convert, lane_states: list[dict]) -> list[dict]:
    """A deep copy of lane states with each carry converted between its in-flight and checkpoint forms."""
    lane_states = copy.deepcopy(lane_states)
    for lane in lane_states:
        for cursor in lane["sources"]:
            cursor["carry"] = convert(cursor["carry"])
    return lane_states


def with_carry_epochs(lane_states: list[dict]) -> list[dict]:
    """Lane states saved before windows knew their epoch have none for their carried tokens: these count as read
    in the first epoch. Returns a copy where any is added; the checkpoint's own states are left as they are."""
    if all("carry_epochs" in cursor for lane in lane_states for cursor in lane["sources"]):
        return lane_states
    lane_states = copy.deepcopy(lane_states)
    for lane in lane_states:
        for cursor in lane["sources"]:
            cursor.setdefault("carry_epochs", [[len(cursor["carry"]), 0]] if len(cursor["carry"]) else [])
    return lane_states


def as_is(item):
    return item


@contextlib.contextmanager
def _sigterm_held():
    """SIGTERM held back (pending, not lost) in this thread while it starts the DataLoader workers, which
    inherit the mask: one that came before a worker had set up its own handling (bind_to_rank) killed it."""
    if sys.platform != "linux":
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def bind_to_rank(rank_pid: int, worker_id: int) -> None:
    """A DataLoader worker lives and stops as its rank decides (Linux only; elsewhere as torch does)."""
    if sys.platform == "linux":
        _die_with_rank(rank_pid)
        _leave_stop_signals_to_the_rank(rank_pid)


def _die_with_rank(rank_pid: int) -> None:
    """Have the kernel kill this worker when its rank dies. A rank killed outright (SIGKILL, the OOM
    killer) otherwise leaves its workers blocked for ever flushing batches nobody reads, each holding
    the dead rank's inherited sockets and memory while the job restarts beside them."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != rank_pid:  # the rank died before the request took effect
        os._exit(1)


def _leave_stop_signals_to_the_rank(rank_pid: int) -> None:
    """SIGTERM asks a rank to finish its step, save and stop (launcher/stopping.py), and it reaches its workers
    too: torchrun passes it on to each rank's whole process group, SLURM's scancel and preemption signal
    every process of the job step. torch's worker handler dies of a SIGTERM that its rank did not send, and
    the rank then raised at once ("DataLoader worker is killed by signal") instead of saving. So a worker
    ends on a SIGTERM only when its rank sent it (the DataLoader shutting it down) and ignores the others:
    SIGTERM is blocked in every thread of the worker (threads started later inherit the mask) and one
    thread takes each with its sender's pid. (SIGUSR1, SLURM's warning, is harmless: a worker inherits
    the rank's handler, which only records it.)"""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # already, when started under _sigterm_held

    def exit_when_the_rank_says():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != rank_pid:
            pass
        os._exit(0)

    threading.Thread(target=exit_when_the_rank_says, name="stop-on-rank-sigterm", daemon=True).start()


def shard_names(plan: Plan) -> list[list[str]]:
    return [[shard.name for shard in source.shards] for source in plan.sources]
