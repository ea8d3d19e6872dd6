"""Who reads which documents: the global stream and how lanes share it.

The global stream of a source does not depend on how many ranks read it. It is
an endless sequence of shard *visits*: visit `v` reads shard
`order(epoch)[v % num_shards]` with `epoch = v // num_shards`, where `order` is a
permutation seeded by (seed, source, epoch). A document's identity is
(visit, index of the record in its shard).

A *lane* is one reader: one worker of one DP rank. Lane `offset` of `stride`
lanes claims visits `base + offset + k * stride` for k = 0, 1, 2, ... (`base` is
0 until the first reshard). Before claiming, a lane finishes its `pending` work,
which is only ever non-empty after a reshard.

Resharding to a new number of lanes is a recomputation, not a guess. Let `F` be
the first visit no old lane has claimed yet. Everything below `F` that is not yet
turned into emitted tokens (the unread rest of each lane's current shard, its
pending work, the documents sitting in its shuffle buffer, and visits below `F`
it had not reached) is collected into a pool and dealt out to the new lanes as
pending work; from `F` on, the new lanes claim visits with the new stride. The
tokens a lane had tokenized but not yet emitted (its packing carry-over) are
handed to new lane `old_lane % new_lanes` to be emitted first.

A document's *epoch* is the pass over its source it was read in, `visit // num_shards`:
like its identity, it does not depend on the layout. The carry-over keeps the epoch of
each of its tokens (as runs of [tokens, epoch]) so that every window knows the epoch it
was read in, which masked language modelling draws a new mask for.
"""

import hashlib
import random
from functools import lru_cache

import numpy

TOKEN_TYPE = numpy.int32

# A work item is [visit, ranges]: the documents of one visit whose record index
# lies in one of the half-open ranges [start, stop); stop None means "to the end".
Ranges = list[list]


@lru_cache(maxsize=64)
def shard_order(seed: int, source_index: int, epoch: int, num_shards: int) -> tuple[int, ...]:
    order = list(range(num_shards))
    random.Random(f"shards/{seed}/{source_index}/{epoch}").shuffle(order)
    return tuple(order)


def shard_of_visit(seed: int, source_index: int, num_shards: int, visit: int) -> int:
    return shard_order(seed, source_index, visit // num_shards, num_shards)[visit % num_shards]


def held_out(shard_name: str, index: int, fraction: float) -> bool:
    """Whether document `index` of the shard file named `shard_name` is held out for validation.

    A hash of the document's identity, not of its position in any stream: the same documents are
    held out at every layout, worker count, seed and epoch, so none is ever trained on."""
    digest = hashlib.blake2b(f"holdout/{shard_name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def shuffle_key(seed: int, source_index: int, base: int, lane: int) -> str:
    """Includes the claim base, so lanes created by a reshard get fresh, still deterministic, shuffles."""
    return f"shuffle/{seed}/{source_index}/{base}/{lane}"


def shuffle_draw(key: str, draw: int, size: int) -> int:
    """The draw-th random index below `size`: a hash, so the generator's whole state is one counter."""
    digest = hashlib.blake2b(f"{key}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % size


def tokens_to_bytes(tokens: list[int]) -> bytes:
    """Carried tokens travel with every batch as bytes, which pickle as one copy where a list pickles int by int."""
    return numpy.asarray(tokens, dtype=TOKEN_TYPE).tobytes()


def tokens_from_bytes(data: bytes) -> list[int]:
    """Checkpoints hold a list: torch.load(weights_only=True) refuses some bytes objects (b"")."""
    return numpy.frombuffer(data, dtype=TOKEN_TYPE).tolist()


def new_cursor(seed: int, source_index: int, base: int, stride: int, lane: int, pending=(), carry=b"",
               carry_epochs=()) -> dict:
    """The state of one source on one lane, as plain data (the carry is bytes in flight, a list in checkpoints)."""
    return {
        "pending": [list(item) for item in pending],
        "claim": [base, stride, lane, 0],  # base, stride, offset, claims made
        "reading": None,  # the work item being read, its ranges shrinking as documents are read
        "buffer": [],  # (visit, index) of the documents in the shuffle buffer, in buffer order
        "shuffle": [shuffle_key(seed, source_index, base, lane), 0],  # key, draws made
        "carry": carry,  # tokens tokenized but not yet emitted, as TOKEN_TYPE bytes
        "carry_epochs": [list(run) for run in carry_epochs],  # [tokens, epoch] runs covering the carry, in order
    }


def next_claim(claim: list[int]) -> int:
    base, stride, offset, made = claim
    return base + offset + made * stride


def advance(ranges: Ranges, past: int) -> Ranges:
    """The ranges with every index below `past` removed."""
    return [[max(start, past), stop] for start, stop in ranges if stop is None or stop > past]


def merge(ranges: Ranges) -> Ranges:
    """Sorted, with overlapping or touching ranges joined, so each work item reads its shard once."""
    merged = []
    for start, stop in sorted(ranges, key=lambda r: r[0]):
        last = merged[-1] if merged else None
        if last and (last[1] is None or last[1] >= start):
            last[1] = None if last[1] is None or stop is None else max(last[1], stop)
        else:
            merged.append([start, stop])
    return merged


def reshard(cursors: list[dict], new_lanes: int, seed: int, source_index: int, limit: int | None) -> list[dict]:
    """Redistributes one source's unfinished work from the old lanes (in old lane order) to `new_lanes` lanes.

    `limit` is the first visit past the last epoch in finite mode (None: endless).
    """
    frontier = max(next_claim(c["claim"]) for c in cursors)
    if limit is not None:
        frontier = min(frontier, limit)
    pool: dict[int, Ranges] = {}
    carries, carry_epochs = [b""] * new_lanes, [[] for _ in range(new_lanes)]
    for old_lane, cursor in enumerate(cursors):
        items = list(cursor["pending"]) + ([cursor["reading"]] if cursor["reading"] else [])
        items += [[visit, [[index, index + 1]]] for visit, index in cursor["buffer"]]
        stride = cursor["claim"][1]
        items += [[visit, [[0, None]]] for visit in range(next_claim(cursor["claim"]), frontier, stride)]
        for visit, ranges in items:
            pool.setdefault(visit, []).extend(ranges)
        carries[old_lane % new_lanes] += cursor["carry"]
        carry_epochs[old_lane % new_lanes] += cursor["carry_epochs"]
    work = [[visit, merge(pool[visit])] for visit in sorted(pool)]
    return [
        new_cursor(seed, source_index, frontier, new_lanes, lane, pending=work[lane::new_lanes], carry=carries[lane],
                   carry_epochs=carry_epochs[lane])
        for lane in range(new_lanes)
    ]
