"""The layout-free format: what a shard holds, and how full tensors are cut into it and put back together.

Why not DeepSpeed's own files: `engine.save_checkpoint` writes ZeRO's flat, padded partitions of one
layout, and reading them at another TP or DP size needs DeepSpeed's offline `ds_to_universal` step.
A Parallax shard instead names what it holds: for each parameter (experts by their global index),
the flat fragment of the fp32 master weight and of both Adam moments that this rank's optimizer
keeps, with its offset in the TP rank's tensor, that tensor's shape, and the TP slice it is. Every
rank writes what it already holds, with no communication; a number held by several ranks
(TP-replicated, or DP replicas at ZeRO-0) is written by one of them. At load each rank reads, from the
memory-mapped files, only the parts of the fragments that overlap what it keeps at its own layout, at
any TP and DP size (at the same layout, its own shard), and builds no full tensor. At the same layout
that restores exactly the numbers that were saved: resume is bitwise. Every fragment carries checksums
of its blocks, and a load checks each block it reads from (checksums.py).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from parallel.checkpoint import checksums
from parallel.checkpoint import deepspeed_adapter as ds
from parallel.checkpoint.deepspeed_adapter import KEYS, MASTER
from parallel.checkpoint.storage import CheckpointError, read_manifest
from parallel.zero3 import full_shape, held_values

# 3: each DP rank's loader state in a file of its own, no longer in client.pt
# 4: block checksums of every fragment, and a checksum of each shard's index in the manifest
FORMAT_VERSION = 4


def _tp_partition(param) -> Optional[int]:
    """The dimension megatron splits `param` along over the TP group, or None if it is replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    assert getattr(param, "partition_stride", 1) == 1, "strided TP partitions are not supported"
    return param.partition_dim


def tp_slice(param, full: torch.Tensor, topo) -> torch.Tensor:
    """This TP rank's part of `param`'s full (TP=1) tensor: the whole of a replicated one."""
    dim = _tp_partition(param)
    return full if dim is None else full.chunk(topo.tp, dim=dim)[topo.tp_rank]


def _owners(sizes: list[int], world_size: int) -> list[int]:
    """Spread tensors over ranks by size, largest first, so every rank writes about as much."""
    load, owner = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(world_size), key=load.__getitem__)
        load[owner[i]] += sizes[i]
    return owner


def saved_name(name: str, param, topo, num_experts: int) -> str:
    """Experts are saved under their global index, so a checkpoint loads at any EP size: local
    expert i of EP rank r is expert r x (experts per rank) + i."""
    from deepspeed.moe.utils import is_moe_param

    if not is_moe_param(param):
        return name
    per_rank = num_experts // topo.ep
    return re.sub(r"(deepspeed_experts\.)(\d+)\.",
                  lambda m: f"{m[1]}{topo.ep_rank * per_rank + int(m[2])}.", name, count=1)


def held_pieces(engine, topo, num_experts: int, staging: dict) -> dict:
    """What this rank writes: a copy in CPU memory of the fragment its optimizer holds of each
    parameter, unless a peer holds the very same numbers and writes them instead (the TP peers of a
    replicated parameter, the DP replicas at ZeRO-0, the first pipeline stage for the last stage's
    copy of a tied embedding). Every number is written once, and no rank
    waits for another.

    The copies are made into `staging`, host buffers kept from the previous save (whose write the
    caller has waited for): fresh ones page-faulted in on every save, some 30 ms of an 83 MB copy
    that otherwise takes 12, and on a GPU they are pinned, which a device-to-host copy needs to run
    at the link's rate."""
    from deepspeed.moe.utils import is_moe_param

    ds.link_optimizer_state(engine)
    named = list(engine.module.named_parameters())
    writers = _owners([full_shape(p).numel() for _, p in named], topo.world_size)
    pieces = {}
    for (name, param), writer in zip(named, writers):
        dim = _tp_partition(param)
        if (dim is None and topo.tp_rank != 0) or ds.is_copy_across_stages(param):
            continue
        if ds.replicated_over_dp(param):
            group = topo.expert_dp_group if is_moe_param(param) else topo.dp_group
            if writer % dist.get_world_size(group) != dist.get_rank(group):
                continue
        held = {key: ds.held_fragment(engine, param, key) for key in KEYS}
        if held[MASTER] is None:
            continue
        pieces[saved_name(name, param, topo, num_experts)] = {
            "tp_rank": 0 if dim is None else topo.tp_rank,
            "tp_size": 1 if dim is None else topo.tp,
            "dim": 0 if dim is None else dim,
            "shape": list(full_shape(param)),
            "start": held[MASTER][0],
            # a copy, not a view: the optimizer steps on while it is written, and torch.save would
            # write the whole flat buffer a ZeRO fragment views
            **{key: _staged(staging, (name, key), value.detach()) for key, (_, value) in held.items()},
        }
    return pieces


def _staged(staging: dict, key: tuple[str, str], value: torch.Tensor) -> torch.Tensor:
    buffer = staging.get(key)
    if buffer is None or buffer.shape != value.shape:
        buffer = staging[key] = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.is_cuda)
    return buffer.copy_(value)


def require_format(path: Path, version) -> None:
    """Refuse, in one line, checkpoint `path` if its client.pt or manifest says another format `version`."""
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is in another Parallax format (version {version}, "
                              f"this code reads {FORMAT_VERSION}); start afresh with --resume none")


def load_shards(path: Path, manifest: dict, names: Optional[list[str]] = None) -> dict[str, dict]:
    """The shard files `names` (default: every one) of checkpoint `path`, memory-mapped, by file name: a rank
    copies out only the fragments it reads. Each one's index (names, offsets, block checksums, generators)
    must match its checksum in the `manifest`, since the fragments' checks rest on it."""
    require_format(path, manifest.get("version"))
    shards = {}
    for name in names or sorted(name for name in manifest["files"] if name.startswith("shard-")):
        try:
            shard = torch.load(path / name, mmap=True, weights_only=True)
        except Exception as e:  # a damaged file fails in the zip reader or the unpickler, in as many ways
            raise CheckpointError(f"{path / name} cannot be read ({type(e).__name__}): altered or corrupt") from None
        if checksums.index_checksum(shard) != manifest["files"][name]["index_crc32"]:
            raise CheckpointError(f"{path / name}: its index (names, offsets, checksums) does not match its checksum "
                                  "in the manifest (altered or corrupt)")
        shards[name] = shard
    return shards


def fragment_bytes(shard: dict) -> int:
    """The bytes of the fp32 fragments (masters and both moments) a shard holds: what a load can read of it."""
    return sum(piece[key].numel() * piece[key].element_size() for piece in shard["pieces"].values() for key in KEYS)


class SavedTensors:
    """A checkpoint's fragments by parameter name, in its memory-mapped shards (`shards`: by file name).

    Every block a fill copies from is checked against its checksum, read whole; `bytes_read` counts the
    bytes of those blocks so far, which hold every byte copied out: what a load read of the checkpoint's
    tensors (the files' pages it checks and copies nothing from, it never reads). Resume reports it, and
    tests hold loads to it. A block that fails its check does not stop the fill (ranks loading are in the
    load's collectives together): `problem` is the first such, one line naming the file, and the reader
    decides once the load is over."""

    def __init__(self, path: Path, shards: dict[str, dict]):
        self.path, self.pieces, self.bytes_read, self.problem = path, {}, 0, None
        for file, shard in shards.items():
            for name, piece in shard["pieces"].items():
                self.pieces.setdefault(name, []).append((file, piece))

    def names(self) -> list[str]:
        return sorted(self.pieces)

    def require_intact(self) -> None:
        if self.problem:
            raise CheckpointError(self.problem)

    def full(self, name: str, key: str) -> torch.Tensor:
        """The whole (TP=1) tensor, for the offline readers; a load fills only what a rank keeps."""
        _, saved = self.pieces[name][0]
        shape = list(saved["shape"])
        shape[saved["dim"]] *= saved["tp_size"]
        return self.fill(name, key, shape, saved["dim"], tp_size=1, tp_rank=0).view(shape)

    def local(self, name: str, key: str, param, topo) -> torch.Tensor:
        """The values this rank keeps of `param` (`ds.kept_range` of its TP rank's tensor), flat."""
        wanted = ds.kept_range(param)
        if name not in self.pieces:
            if wanted[0] < wanted[1]:
                raise CheckpointError(f"checkpoint {self.path} has no tensor {name}; it was saved from another model")
            return torch.zeros(0)  # it keeps none of it, and at the saved layout opens no shard that holds it
        dim = _tp_partition(param)
        tp_size, tp_rank = (1, 0) if dim is None else (topo.tp, topo.tp_rank)
        return self.fill(name, key, list(full_shape(param)), dim or 0, tp_size, tp_rank, wanted)

    def fill(self, name: str, key: str, shape: list[int], partition_dim: int, tp_size: int, tp_rank: int,
             wanted: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The flat range `wanted` (default: all) of TP rank `tp_rank` of `tp_size`'s tensor (`shape`) of
        `name`, split along `partition_dim`, at any saved TP size: a rank holds no more than it keeps.

        Seen as (rows, partition_dim, inner), the part of saved TP rank s's tensor that lies in this one is
        the same band of columns in every row, so each saved fragment overlapping it is copied in at
        most five pieces (a block of whole rows through strided views, and the rows the fragment or
        `wanted` cuts short): only the bytes this rank keeps are copied, and no full tensor is built. The
        blocks they lie in are checked against their checksums."""
        pieces = self.pieces[name]
        _, some = pieces[0]
        saved_shape, saved_tp_size = some["shape"], some["tp_size"]
        saved_whole, whole = list(saved_shape), list(shape)
        saved_whole[partition_dim] *= saved_tp_size
        whole[partition_dim] *= tp_size
        if saved_whole != whole or (saved_tp_size > 1 and some["dim"] != partition_dim):
            raise CheckpointError(f"checkpoint {self.path} holds {name} in another shape; "
                                  "it was saved from another model")
        rows, inner = math.prod(shape[:partition_dim]), math.prod(shape[partition_dim + 1:])
        width, saved_width = shape[partition_dim], saved_shape[partition_dim]
        lo, hi = wanted or (0, math.prod(shape))
        kept = torch.empty(max(hi - lo, 0), dtype=torch.float32)  # every element is copied in, or this raises
        covered = 0
        for file, piece in pieces:
            # the columns of the full tensor along partition_dim that both this TP rank and the saved one hold
            first = max(tp_rank * width, piece["tp_rank"] * saved_width)
            last = min((tp_rank + 1) * width, (piece["tp_rank"] + 1) * saved_width)
            if first >= last:
                continue
            here = _Band((first - tp_rank * width) * inner - lo, width * inner, 0, hi - lo)  # in `kept`
            column, start = (first - piece["tp_rank"] * saved_width) * inner, piece["start"]  # in the saved tensor
            there = _Band(column - start, saved_width * inner, 0, piece[key].numel())
            copied, span_first, span_end = _copy_band(kept, here, piece[key], there, rows, (last - first) * inner)
            if copied:
                covered += copied
                read, intact = checksums.verify_read(piece, key, start + span_first, start + span_end, column,
                                                     column + (last - first) * inner)
                self.bytes_read += read
                if not intact and self.problem is None:
                    self.problem = (f"{self.path / file}: {name} ({key}) does not match its block checksums "
                                    "(altered or corrupt)")
        if covered != max(hi - lo, 0):
            raise CheckpointError(f"checkpoint {self.path} lacks part of {name}; it was not written whole, use another")
        return kept


class _Band:
    """Where one run of columns lies in each row of a flat tensor: row r starts at `first` + r x `stride`;
    only the elements in [`lo`, `hi`) are to be touched (the rank's kept range, or a fragment's extent)."""

    def __init__(self, first: int, stride: int, lo: int, hi: int):
        self.first, self.stride, self.lo, self.hi = first, stride, lo, hi

    def start(self, row: int) -> int:
        return self.first + row * self.stride

    def first_row_from(self, offset: int, bound: int) -> int:
        """The first row whose element `offset` into it lies at or past flat index `bound`."""
        return max(0, -(-(bound - self.first - offset) // self.stride))


def _copy_band(dst: torch.Tensor, dst_band: _Band, src: torch.Tensor, src_band: _Band, rows: int,
               width: int) -> tuple[int, int, int]:
    """Copy `width` elements of each of `rows` rows from `src`'s band to `dst`'s, only where both bands allow
    (their [lo, hi)); returns how many were copied, and the flat span of `src` they came from, [first, end).
    Rows wholly allowed on both sides are one strided copy; each band's bounds cut at most one row at each
    end, so at most four rows are copied one by one."""
    bands = (dst_band, src_band)
    whole_from = max(b.first_row_from(0, b.lo) for b in bands)
    whole_to = min([rows] + [b.first_row_from(width, b.hi + 1) for b in bands])
    touched_from = max(b.first_row_from(width, b.lo + 1) for b in bands)
    touched_to = min([rows] + [b.first_row_from(0, b.hi) for b in bands])

    def cut(row: int) -> tuple[int, int, int, int]:
        return (row, 1, max([0] + [b.lo - b.start(row) for b in bands]),
                min([width] + [b.hi - b.start(row) for b in bands]))
    if whole_from < whole_to:
        runs = [*map(cut, range(touched_from, whole_from)), (whole_from, whole_to - whole_from, 0, width),
                *map(cut, range(whole_to, touched_to))]
    else:
        runs = [cut(row) for row in range(touched_from, touched_to)]
    runs = [(row, count, begin, end) for row, count, begin, end in runs if begin < end]  # (first row, rows, columns)
    for row, count, begin, end in runs:
        dst.as_strided((count, end - begin), (dst_band.stride, 1), dst.storage_offset() + dst_band.start(row) + begin
                       ).copy_(src.as_strided((count, end - begin), (src_band.stride, 1),
                                              src.storage_offset() + src_band.start(row) + begin))
    if not runs:
        return 0, 0, 0
    (first_row, _, first_column, _), (last_row, last_count, _, last_end) = runs[0], runs[-1]
    return (sum(count * (end - begin) for _, count, begin, end in runs), src_band.start(first_row) + first_column,
            src_band.start(last_row + last_count - 1) + last_end)


def restore(engine, topo, num_experts: int, saved: SavedTensors, adam_step: int) -> None:
    """Fill the engine's fp32 masters, Adam moments and weights at this layout from `saved`."""
    ds.prepare_adam_state(engine, adam_step)
    for name, param in engine.module.named_parameters():
        name = saved_name(name, param, topo, num_experts)
        for key in KEYS:
            ds.write_local(engine, param, key, saved.local(name, key, param, topo).to(param.device))
    ds.refresh_model_weights(engine)


def read_tensors(path: Path, keys: tuple[str, ...] = KEYS) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter of checkpoint `path` as full tensors: {name: {"param", "exp_avg", "exp_avg_sq"}}, or
    only the `keys` asked for, whose fragments alone are read."""
    saved = SavedTensors(path, load_shards(path, read_manifest(path)))
    tensors = {name: {key: saved.full(name, key) for key in keys} for name in saved.names()}
    saved.require_intact()
    return tensors


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of checkpoint `path` (no optimizer state), at any saved layout."""
    return {name: tensors[MASTER] for name, tensors in read_tensors(path, keys=(MASTER,)).items()}


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], topo) -> None:
    """Fill a freshly built model (before DeepSpeed's engine takes it) from full tensors under TP=1
    names, such as a Hugging Face directory's (model.init_from): each rank keeps its TP slice, and the
    engine then partitions the weights over DP as it would random ones, at any ZeRO stage (at
    ZeRO-3 they were partitioned as they were built, and each rank writes its partition). A pipeline
    stage holds only its own layers (and a last stage's copy of a tied embedding, filled from the same
    tensor as the first stage's embedding), so at PP > 1 the weights may hold tensors it does not."""
    ours = dict(model.named_parameters())
    mine = state.keys() if topo.pp == 1 else state.keys() & ours.keys()
    if ours.keys() != mine:
        raise ValueError(f"the model and the weights differ in tensors: the model alone has "
                         f"{sorted(ours.keys() - state.keys())}, the weights alone {sorted(mine - ours.keys())}")
    with torch.no_grad():
        for name, param in ours.items():
            _, start, held = held_values(param)
            held.copy_(tp_slice(param, state[name], topo).flatten()[start:start + held.numel()])


def consolidate(path: Path, out: Path) -> int:
    """Write the full fp32 model state dict of checkpoint `path` to `out` as one file; returns its parameter count."""
    state = read_weights(path)
    torch.save(state, out)
    return sum(t.numel() for t in state.values())
