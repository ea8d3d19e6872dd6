"""Sharded checkpoints that resume at any layout, committed atomically.

Why not DeepSpeed's own files: `engine.save_checkpoint` writes ZeRO's flat, padded partitions of one
layout, and reading them at another TP or DP size needs DeepSpeed's offline `ds_to_universal` step.
A Parallax shard file instead names what it holds: for each parameter (experts by their global
index), the flat fragment of the fp32 master weight and of both Adam moments that this rank's
optimizer keeps, with its offset in the TP rank's tensor, that tensor's shape, and the TP slice it
is. Every rank writes what it already holds, at once and with no communication; a number held by
several ranks (TP-replicated, or DP replicas at ZeRO-0) is written by one of them. At load each rank
assembles a parameter's full tensor from the memory-mapped files and keeps the slice it owns at its
own layout. At the same layout that restores exactly the numbers that were saved: resume is bitwise.

A run's checkpoint directory:

    step-00000020/  shard-00000.pt shard-00001.pt ...  client.pt  config.yaml  manifest.json
    latest          "step-00000020"

A save is written to `.step-00000020.tmp/`; every file is fsynced and listed with its size and
crc32 in `manifest.json`, written last by rank 0 once every rank reported success; then the
directory is renamed into place and only then is `latest` rewritten. A crash at any moment leaves
the previous checkpoint complete, and resume uses only a directory whose files match its manifest.

Reports, agreements and loader states travel on the topology's gloo control group, never on the
NCCL data plane (parallel/topology.py). When to save, and what a failed save means, is the training
loop's decision (launcher/train.py): this module only saves and loads.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "param"  # the key of the fp32 master weight next to the moments
MANIFEST, CLIENT, LATEST = "manifest.json", "client.pt", "latest"
FORMAT_VERSION = 2


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is the one line the user sees."""


@dataclass(frozen=True)
class Resumed:
    step: int = 0
    tokens: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# --- where each parameter's fp32 master and Adam moments live, at any ZeRO stage -------------------

def _local_shape(param) -> torch.Size:
    """This TP rank's shape of `param`; ZeRO-3 leaves only a partition in `param` itself."""
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def _held_fragment(engine, param, key: str) -> Optional[tuple[int, torch.Tensor]]:
    """(flat offset, fp32 values) of the part of this TP rank's tensor that this rank's optimizer holds,
    for the master weight or an Adam moment; None if it holds none of it."""
    if hasattr(param, "ds_id"):  # ZeRO-3: partition r of the flattened tensor, padded at the end
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        n = param.ds_tensor.numel()
        start = n * dist.get_rank(param.ds_process_group)
        value = safe_get_local_fp32_param(param) if key == MASTER else safe_get_local_optimizer_state(param, key)
        numel = min(n, param.ds_numel - start)
        return (start, value.flatten()[:numel]) if numel > 0 else None
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer: a slice of the DP-flat buffer
        mapping = param._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(None if key == MASTER else key)
    return 0, _zero0_fp32(engine, param, key)


def _zero0_fp32(engine, param, key: str) -> torch.Tensor:
    """At ZeRO-0, `param`'s whole fp32 master or Adam moment, flat. In fp32 the torch optimizer steps
    the model's own parameters; in bf16 and fp16 DeepSpeed's FP16_UnfusedOptimizer (the wrapper it
    puts around torch's AdamW) steps an fp32 copy of each."""
    opt, master = engine.optimizer, param
    for params, copies in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        master = next((copy for p, copy in zip(params, copies) if p is param), master)
    return (master.data if key == MASTER else _base_optimizer(engine).state[master][key]).flatten()


def _write_local(engine, param, key: str, value: torch.Tensor, dp_rank: int, dp: int) -> None:
    """Store this TP rank's whole tensor `value`: each DP rank keeps its own ZeRO partition of it."""
    from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                 safe_set_local_fp32_param, safe_set_local_optimizer_state)

    if hasattr(param, "ds_id"):
        # ZeRO-3's own full-tensor setter cannot cut the last, padded partition; cut it here.
        n = param.ds_tensor.numel()
        flat = torch.nn.functional.pad(value.flatten(), (0, n * dp - value.numel()))
        mine = flat.narrow(0, n * dp_rank, n)
        safe_set_local_fp32_param(param, mine) if key == MASTER else safe_set_local_optimizer_state(param, mine, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer
        if key == MASTER:
            safe_set_full_fp32_param(param, value)
            # Each rank keeps the whole low-precision weight and has the whole value here, so it writes
            # it itself: the engine's own refresh would all-gather the weights over DP (half of a load).
            param.data.copy_(value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    else:  # ZeRO-0: every DP rank holds the whole tensor
        _zero0_fp32(engine, param, key).copy_(value.flatten())
        if key == MASTER and param.dtype != torch.float32:
            param.data.copy_(value)  # the bf16/fp16 weight the forward pass reads; in fp32 it is the master itself


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW underneath; ZeRO and the bf16 optimizer wrap it as `.optimizer`."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _adam_step(engine) -> int:
    states = [s for s in _base_optimizer(engine).state.values() if "step" in s]
    return int(states[0]["step"]) if states else 0


def _prepare_adam_state(engine, step: int) -> None:
    """Give a fresh optimizer the state torch's AdamW creates at its first step, so moments can be written into it."""
    base = _base_optimizer(engine)
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only for the length of a step.
    stepped = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        p for group in base.param_groups for p in group["params"]]
    for p in stepped:
        state = base.state[p]
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        for key in ADAM_MOMENTS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Point each parameter at its fragment of the flat Adam state (ZeRO-1/2, bf16).

    DeepSpeed 0.19's ZeRO-1/2 link once, after stepping the first param group but before the later
    groups have any state, which leaves those groups' moments unreachable; link again now.
    """
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _refresh_model_weights(engine) -> None:
    """ZeRO-3: copy the restored fp32 master partitions into the partitions the forward pass gathers.
    (ZeRO-0, 1 and 2 keep whole weights on every rank, which _write_local writes.)"""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group)


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


def _replicated_over_dp(param) -> bool:
    """At ZeRO-0 every DP rank holds and steps the whole parameter; ZeRO partitions it."""
    return not hasattr(param, "ds_id") and not hasattr(param, "_hp_mapping")


def _load_shards(path: Path) -> list[dict]:
    """Every rank's shard file, memory-mapped: a rank copies out only the fragments it reads."""
    shards = [torch.load(path / name, mmap=True, weights_only=True)
              for name in sorted(read_manifest(path)["files"]) if name.startswith("shard-")]
    if any("pieces" not in shard for shard in shards):
        raise CheckpointError(f"checkpoint {path} is in an older Parallax format; start afresh with --resume none")
    return shards


def _pieces_by_name(shards: list[dict]) -> dict[str, list[dict]]:
    pieces: dict[str, list[dict]] = {}
    for shard in shards:
        for name, piece in shard["pieces"].items():
            pieces.setdefault(name, []).append(piece)
    return pieces


def _assemble(path: Path, name: str, pieces: list[dict], key: str) -> torch.Tensor:
    """One full tensor out of the fragments the ranks wrote: each TP rank's tensor is filled from its
    flat fragments, then the TP ranks' tensors are joined along megatron's partition_dim."""
    shape, tp_size, dim = pieces[0]["shape"], pieces[0]["tp_size"], pieces[0]["dim"]
    parts = []
    for tp_rank in range(tp_size):
        flat, covered = torch.empty(math.prod(shape), dtype=torch.float32), 0
        for piece in pieces:
            if piece["tp_rank"] == tp_rank:
                fragment = piece[key]
                flat[piece["start"]:piece["start"] + fragment.numel()] = fragment
                covered += fragment.numel()
        if covered != flat.numel():
            raise CheckpointError(f"checkpoint {path} lacks part of {name}; it was not written whole, use another")
        parts.append(flat.view(shape))
    return parts[0] if tp_size == 1 else torch.cat(parts, dim=dim)


# --- files: every byte checksummed as it is written, fsynced, committed by rename ------------------

def _find_sync_file_range():
    """Linux's sync_file_range(2), or None where libc has none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_sync_file_range = _find_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range back; do not wait for it
_WRITEBACK_EVERY = 8 << 20  # bytes


class _ChecksummedFile:
    """A write-only file that keeps the crc32 and size of what went through it.

    Every 8 MB it asks the kernel to start writing back what it has (RocksDB's bytes_per_sync), so
    the disk works while the rest is serialized and the closing fsync only waits for the tail:
    measured on 83 MB here, write + fsync fell from 0.10 s to 0.077 s.
    """

    def __init__(self, path: Path):
        self.file, self.crc, self.size = open(path, "wb"), 0, 0
        self.written_back = 0  # bytes whose write-back has been started
        self.failure: Optional[OSError] = None

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        try:
            written = self.file.write(data)
            if _sync_file_range is not None and self.size - self.written_back >= _WRITEBACK_EVERY:
                self.file.flush()
                _sync_file_range(self.file.fileno(), self.written_back, self.size - self.written_back,
                                 _SYNC_FILE_RANGE_WRITE)
                self.written_back = self.size
            return written
        except OSError as e:
            self.failure = e
            raise

    def flush(self):
        self.file.flush()

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "crc32": self.crc}


def _save_file(obj, path: Path) -> dict:
    from torch.utils.serialization import config

    out = _ChecksummedFile(path)
    try:
        # The manifest's crc32 covers every byte of the file, so the zip format's own crc32 of each
        # record would checksum the same bytes twice; skipping it makes a save ~1.5x faster.
        with config.patch({"save.compute_crc32": False}):
            torch.save(obj, out)
    except RuntimeError:
        if out.failure is None:
            raise
        raise out.failure from None  # torch's zip writer reports the disk's own error as a RuntimeError
    finally:
        entry = out.close()
    return entry


def _save_text(text: str, path: Path) -> dict:
    out = _ChecksummedFile(path)
    try:
        out.write(text.encode())
    finally:
        entry = out.close()
    return entry


def _os_error(action) -> Optional[str]:
    """Run `action`; a disk failure (full, read-only, gone) comes back as its message, not an exception."""
    try:
        action()
    except OSError as e:
        return str(e)
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path: Path, files: Optional[list[str]] = None) -> Optional[str]:
    """The first file of checkpoint `path` (or of `files` in it) that does not match the manifest, as
    one line naming it; None if they all match. A missing or unreadable manifest names the manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path / MANIFEST} is missing or unreadable"
    for name in listed if files is None else files:
        file, expected = path / name, listed[name]
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file} has {file.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
        if _file_crc(file) != expected["crc32"]:
            return f"{file} does not match its checksum in the manifest (altered or corrupt)"
    return None


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoints under `root`, newest first (temporary directories are not committed)."""
    if not root.is_dir():
        return []
    steps = [int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(steps, reverse=True)


# --- RNG -----------------------------------------------------------------------------------------

def _rng_state() -> dict:
    """This process's generators. On a GPU, only its own device's: a rank draws on no other, and
    a checkpoint must resume where fewer GPUs are visible, or none."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():  # saved on a GPU, resumed on one
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


# --- the object the training loop talks to ---------------------------------------------------------

def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


class Checkpointer:
    """Saves and resumes one run's checkpoints; every method is collective over all ranks.

    `loader` is the batch source: its `state_dict()` per DP rank is saved, and its
    `load_state_dict(states)` receives the states of every DP rank of the saved run, so it can
    reshard them onto a different DP size. Without one (evaluation), resume restores the model only.
    """

    def __init__(self, cfg, topo, engine, loader):
        self.cfg, self.topo, self.engine, self.loader = cfg, topo, engine, loader
        self.root = checkpoint_root(cfg)

    def _say(self, line: str) -> None:
        if self.topo.is_logging_rank:
            print(f"parallax: {line}", flush=True)

    # --- save ---

    def save(self, step: int, tokens: int) -> Optional[str]:
        """Write and commit the checkpoint of `step`. On a disk failure, the same one line on every
        rank saying what failed and what is left; the previous checkpoint is untouched."""
        topo, name, control = self.topo, step_dir_name(step), self.topo.control_group
        tmp, final = self.root / f".{name}.tmp", self.root / name
        pieces = self._my_pieces()
        data_states = self._gather_data_states()  # a collective: every rank must reach it, whatever its disk does
        entries = {}

        def fresh_directory():
            for abandoned in self.root.glob(".step-*.tmp"):  # left by a crash during an earlier save or prune
                shutil.rmtree(abandoned, ignore_errors=True)
            tmp.mkdir(parents=True)

        def write_files():
            shard = f"shard-{topo.rank:05d}.pt"
            entries[shard] = _save_file({"pieces": pieces, "rng": _rng_state()}, tmp / shard)
            if topo.rank == 0:
                entries[CLIENT] = _save_file(self._client_state(step, tokens, data_states), tmp / CLIENT)
                entries["config.yaml"] = _save_text(self.cfg.to_yaml(), tmp / "config.yaml")

        error = _os_error(fresh_directory) if topo.rank == 0 else None
        dist.barrier(group=control)
        error = error or _os_error(write_files)
        if error:
            error = f"rank {topo.rank}: {error}"
        reports = [None] * topo.world_size
        dist.all_gather_object(reports, (entries, error), group=control)
        error = next((err for _, err in reports if err), None)
        if topo.rank == 0 and error is None:
            error = self._commit(tmp, final, step, tokens, {k: v for files, _ in reports for k, v in files.items()})
        if topo.rank == 0 and error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=control)
        error = outcome[0]
        if error is None:
            self._say(f"checkpoint saved: {final}")
            return None
        previous = checkpoint_steps(self.root)
        kept = f"{self.root / step_dir_name(previous[0])} is intact" if previous else "there is no earlier checkpoint"
        return f"checkpoint of step {step} failed ({error}); {kept}"

    def _my_pieces(self) -> dict:
        """What this rank writes: the fragment its optimizer holds of each parameter, unless a peer
        holds the very same numbers and writes them instead (the TP peers of a replicated parameter,
        the DP replicas at ZeRO-0). Every number is written once, and no rank waits for another."""
        from deepspeed.moe.utils import is_moe_param

        topo = self.topo
        _link_optimizer_state(self.engine)
        named = list(self.engine.module.named_parameters())
        writers = _owners([_local_shape(p).numel() for _, p in named], topo.world_size)
        pieces = {}
        for (name, param), writer in zip(named, writers):
            dim = _tp_partition(param)
            if dim is None and topo.tp_rank != 0:
                continue
            if _replicated_over_dp(param):
                group = topo.expert_dp_group if is_moe_param(param) else topo.dp_group
                if writer % dist.get_world_size(group) != dist.get_rank(group):
                    continue
            held = {key: _held_fragment(self.engine, param, key) for key in (MASTER, *ADAM_MOMENTS)}
            if held[MASTER] is None:
                continue
            pieces[self._saved_name(name, param)] = {
                "tp_rank": 0 if dim is None else topo.tp_rank,
                "tp_size": 1 if dim is None else topo.tp,
                "dim": 0 if dim is None else dim,
                "shape": list(_local_shape(param)),
                "start": held[MASTER][0],
                # a copy, not a view: torch.save would write the whole flat buffer a ZeRO fragment views
                **{key: value.detach().to("cpu", copy=True) for key, (_, value) in held.items()},
            }
        return pieces

    def _saved_name(self, name: str, param) -> str:
        """Experts are saved under their global index, so a checkpoint loads at any EP size: local
        expert i of EP rank r is expert r x (experts per rank) + i."""
        from deepspeed.moe.utils import is_moe_param

        if not is_moe_param(param):
            return name
        per_rank = self.cfg.model.moe.num_experts // self.topo.ep
        return re.sub(r"(deepspeed_experts\.)(\d+)\.",
                      lambda m: f"{m[1]}{self.topo.ep_rank * per_rank + int(m[2])}.", name, count=1)

    def _gather_data_states(self) -> Optional[list]:
        """Every DP rank's data state, in DP order, on rank 0 (which writes them); None elsewhere.
        TP peers share their DP rank's state, so only TP rank 0 sends it."""
        topo = self.topo
        mine = (topo.dp_rank, self.loader.state_dict()) if topo.tp_rank == 0 else None
        gathered = [None] * topo.world_size if topo.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=topo.control_group)
        return [state for _, state in sorted((s for s in gathered if s is not None), key=lambda s: s[0])] if gathered else None

    def _client_state(self, step: int, tokens: int, data_states: list) -> dict:
        scheduler = self.engine.lr_scheduler
        return {
            "version": FORMAT_VERSION,
            "step": step,
            "tokens": tokens,
            "adam_step": _adam_step(self.engine),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None else None,
            "data": data_states,
            "config": self.cfg.model_dump(mode="json"),
            "layout": self._layout(),
        }

    def _layout(self) -> dict:
        t = self.topo
        return {"world_size": t.world_size, "tp": t.tp, "dp": t.dp, "zero_stage": self.cfg.parallel.zero_stage}

    def _commit(self, tmp: Path, final: Path, step: int, tokens: int, files: dict) -> Optional[str]:
        """Rank 0, once every rank's files are on disk: manifest, rename into place, move `latest`, prune."""
        manifest = {"version": FORMAT_VERSION, "step": step, "tokens": tokens, "layout": self._layout(), "files": files}

        def publish():
            _save_text(json.dumps(manifest, indent=1), tmp / MANIFEST)
            _fsync_dir(tmp)
            if final.exists():  # a damaged checkpoint of the same step, skipped when this run resumed
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            _save_text(final.name, self.root / f".{LATEST}.tmp")
            os.replace(self.root / f".{LATEST}.tmp", self.root / LATEST)
            _fsync_dir(self.root)

        error = _os_error(publish)
        if error:
            return f"rank 0: {error}"
        # Pruning is a rename, then deletion off the training loop's path (deleting hundreds of MB
        # blocked a save longer than writing it). Renamed to a name resume never reads, a half-deleted
        # directory is harmless and the next save clears what is left; the thread is not a daemon,
        # so a rank that ends normally finishes the deletion first.
        for old in checkpoint_steps(self.root)[self.cfg.checkpoint.keep:]:
            doomed = self.root / f".{step_dir_name(old)}.pruned.tmp"
            if _os_error(lambda: os.rename(self.root / step_dir_name(old), doomed)) is None:
                threading.Thread(target=shutil.rmtree, args=(doomed, True)).start()
        return None

    # --- resume ---

    def resume(self) -> Resumed:
        """Load the checkpoint checkpoint.resume names (auto: the newest complete one) and say where to continue."""
        path = self._choose()
        if path is None:
            return Resumed()
        client = torch.load(path / CLIENT, weights_only=True)
        self._check_same_model(path, client["config"])
        self._load_tensors(path, client)
        if client["lr_scheduler"] is not None:
            scheduler = self.engine.lr_scheduler
            scheduler.load_state_dict(client["lr_scheduler"])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.engine.global_steps = client["step"]
        self.engine.global_samples = client["step"] * self.engine.train_batch_size()
        if self.loader is not None:  # None: weights only, to evaluate them
            self.loader.load_state_dict(client["data"])
        old = client["layout"]
        self._say(f"resumed from {path} at step {client['step']} (saved at tp={old['tp']} dp={old['dp']} "
                  f"zero={old['zero_stage']})")
        return Resumed(step=client["step"], tokens=client["tokens"])

    def _choose(self) -> Optional[Path]:
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return None
        if choice != "auto":
            path = Path(choice)
            if not (path / MANIFEST).exists() and (path / LATEST).is_file():  # a checkpoint root was named
                path = path / (path / LATEST).read_text().strip()
            problem = self._verify_together(path)
            if problem:
                raise CheckpointError(f"cannot resume: {problem}; pass another checkpoint or --resume auto")
            return path
        for step in checkpoint_steps(self.root):
            path = self.root / step_dir_name(step)
            problem = self._verify_together(path)
            if problem is None:
                return path
            self._say(f"warning: skipping checkpoint {path.name}: {problem}")
        return None

    def _verify_together(self, path: Path) -> Optional[str]:
        """Every rank checks its share of the files, so a large checkpoint verifies in parallel."""
        try:
            names = sorted(read_manifest(path)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            names = None
        problem = verify(path, names[self.topo.rank::self.topo.world_size] if names is not None else None)
        problems = [None] * self.topo.world_size
        dist.all_gather_object(problems, problem, group=self.topo.control_group)
        return next((p for p in problems if p), None)

    def _check_same_model(self, path: Path, saved_config: dict) -> None:
        ours = self.cfg.model.model_dump(mode="json")
        for key, value in saved_config["model"].items():
            if ours.get(key) != value:
                raise CheckpointError(
                    f"checkpoint {path} has model.{key}={value} but this run has model.{key}={ours.get(key)}; "
                    "resume with the model it was trained with, or --resume none to start afresh"
                )

    def _load_tensors(self, path: Path, client: dict) -> None:
        topo, engine = self.topo, self.engine
        shards = _load_shards(path)
        pieces = _pieces_by_name(shards)
        _prepare_adam_state(engine, client["adam_step"])
        for name, param in engine.module.named_parameters():
            saved = self._saved_name(name, param)
            if saved not in pieces:
                raise CheckpointError(f"checkpoint {path} has no tensor {saved}; it was saved from another model")
            for key in (MASTER, *ADAM_MOMENTS):
                value = tp_slice(param, _assemble(path, saved, pieces[saved], key), topo)
                _write_local(engine, param, key, value.to(param.device), topo.dp_rank, topo.dp)
        _refresh_model_weights(engine)
        same_world = client["layout"]["world_size"] == topo.world_size
        # The generators of this very rank, or rank 0's when the world changed size (every rank is seeded alike).
        _set_rng_state(shards[topo.rank if same_world else 0]["rng"])


# --- offline -------------------------------------------------------------------------------------

def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The checkpoint of `step` (default: the newest complete one) of a run directory or a checkpoint
    root, or `run_dir` itself if it is a checkpoint."""
    if (run_dir / MANIFEST).exists() and step is None:
        problem = verify(run_dir)
        if problem:
            raise CheckpointError(f"cannot use checkpoint {run_dir}: {problem}")
        return run_dir
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    steps = checkpoint_steps(root) if step is None else [step]
    for s in steps:
        path = root / step_dir_name(s)
        problem = verify(path)
        if problem is None:
            return path
        if step is not None:
            raise CheckpointError(f"cannot use checkpoint {path}: {problem}")
    raise CheckpointError(f"no complete checkpoint under {root}; pass a run directory that has checkpoints/step-*")


def read_tensors(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter of checkpoint `path` as full tensors: {name: {"param", "exp_avg", "exp_avg_sq"}}."""
    pieces = _pieces_by_name(_load_shards(path))
    return {name: {key: _assemble(path, name, parts, key) for key in (MASTER, *ADAM_MOMENTS)}
            for name, parts in sorted(pieces.items())}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of checkpoint `path` (no optimizer state), at any saved layout."""
    pieces = _pieces_by_name(_load_shards(path))
    return {name: _assemble(path, name, parts, MASTER) for name, parts in sorted(pieces.items())}


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor], topo) -> None:
    """Fill a freshly built model (before DeepSpeed's engine takes it) from full tensors under TP=1
    names, such as a Hugging Face directory's (model.init_from): each rank keeps its TP slice, and the
    engine then partitions the weights over DP as it would random ones, at any ZeRO stage."""
    ours = dict(model.named_parameters())
    if ours.keys() != state.keys():
        raise ValueError(f"the model and the weights differ in tensors: the model alone has "
                         f"{sorted(ours.keys() - state.keys())}, the weights alone {sorted(state.keys() - ours.keys())}")
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(tp_slice(param, state[name], topo))


def consolidate(path: Path, out: Path) -> int:
    """Write the full fp32 model state dict of checkpoint `path` to `out` as one file; returns its parameter count."""
    state = read_weights(path)
    torch.save(state, out)
    return sum(t.numel() for t in state.values())
