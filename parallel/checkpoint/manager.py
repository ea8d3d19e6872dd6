"""The Checkpointer: the object the training loop calls to resume a run and to save it.

A save blocks the loop only while each rank copies its fragments to CPU memory; a background
thread writes, fsyncs and commits them while training goes on. Each DP rank's loader state is a
file of its own, written by that rank, so no rank gathers the others' (shuffle buffers of document
text) and a resuming rank reads only the states it needs. The thread's reports and agreements
travel on the topology's `save_group`, a gloo group only that thread uses (a gloo group must
not serve two threads at once, and the loop's stop vote is on `control_group`); resume's go on
`control_group`. Neither touches the NCCL data plane (parallel/topology.py). When to save, and
what a failed save means, is the training loop's decision (launcher/train.py): this module only
saves and loads. docs/checkpoints.md has the design.
"""
from __future__ import annotations

import copy
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from parallel.checkpoint import checksums
from parallel.checkpoint import deepspeed_adapter as ds
from parallel.checkpoint import layout_free as fmt
from parallel.checkpoint import storage
from parallel.checkpoint.storage import CLIENT, LATEST, MANIFEST, CheckpointError, step_dir_name

if TYPE_CHECKING:
    from models.config import ModelConfig


class PendingSave:
    """A checkpoint being written and committed in the background. `wait()` is its outcome, the
    same on every rank: None once it is committed, else the one line saying what failed and what
    is left. An unexpected error of the writer (a peer gone, say) is raised by `wait()` instead."""

    def __init__(self, write: Callable[[], Optional[str]]):
        self._outcome: Optional[str] = None
        self._crash: Optional[BaseException] = None
        # A daemon: a rank that fails while a save is in flight must exit rather than wait on peers
        # that may be gone; the checkpoint it was writing is then never committed, and `latest`
        # still names the previous one.
        self._thread = threading.Thread(target=self._run, args=(write,), name="checkpoint-save", daemon=True)
        self._thread.start()

    def _run(self, write) -> None:
        try:
            self._outcome = write()
        except BaseException as e:
            self._crash = e

    def wait(self) -> Optional[str]:
        self._thread.join()
        if self._crash is not None:
            raise self._crash
        return self._outcome


@dataclass(frozen=True)
class Resumed:
    step: int = 0
    tokens: int = 0
    tensor_bytes_read: int = 0  # of the checkpoint's fp32 fragments, by this rank, to load or to verify them


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


class Checkpointer:
    """Saves and resumes one run's checkpoints; every method is collective over all ranks.

    `loader` is the batch source: its `state_dict()` per DP rank is saved, and its
    `load_state_dict(states)` receives the states of every DP rank of the saved run, so it can
    reshard them onto a different DP size; `states` reads each one from its file when the loader
    first asks for it. Without one (evaluation), resume restores the model only.
    """

    def __init__(self, cfg, topo, engine, loader):
        ds.check_deepspeed_version()
        self.cfg, self.topo, self.engine, self.loader = cfg, topo, engine, loader
        self.root = checkpoint_root(cfg)
        self.num_experts = cfg.model.moe.num_experts if cfg.model.moe else 0
        self._pending: Optional[PendingSave] = None
        self._staging: dict = {}  # the host copies of this rank's fragments, reused by every save

    def _say(self, line: str) -> None:
        if self.topo.is_logging_rank:
            print(f"parallax: {line}", flush=True)

    # --- save ---

    def save(self, step: int, tokens: int) -> PendingSave:
        """Start saving the checkpoint of `step`. The caller is blocked only while this rank copies
        what it saves into CPU memory; writing, fsync and the commit run in a background thread, and
        the returned save's `wait()` is their outcome. A save first waits for the one before it."""
        if self._pending is not None:
            self._pending.wait()
        shard = {"pieces": fmt.held_pieces(self.engine, self.topo, self.num_experts, self._staging), "rng": _rng_state()}
        client = self._client_state(step, tokens)
        # A DP rank's TP and pipeline peers read the same batches: one of them saves where they are
        data_state = copy.deepcopy(self.loader.state_dict()) if self.topo.writes_loader_state else None
        self._pending = PendingSave(lambda: self._write_and_commit(step, shard, client, data_state))
        return self._pending

    def _write_and_commit(self, step: int, shard: dict, client: dict, data_state) -> Optional[str]:
        """The background half of a save, collective over the save group: every rank writes its shard,
        rank 0 commits once every rank reported success. On a disk failure, the same one line on every
        rank saying what failed and what is left; the previous checkpoint is untouched."""
        topo, group, name = self.topo, self.topo.save_group, step_dir_name(step)
        tmp, final = self.root / f".{name}.tmp", self.root / name
        entries = {}

        def write_files():
            shard_name = storage.shard_file_name(topo.rank)
            checksums.add_block_checksums(shard["pieces"], self.cfg.checkpoint.checksum_block_bytes)
            entries[shard_name] = {**storage.save_file(shard, tmp / shard_name),
                                   "index_crc32": checksums.index_checksum(shard)}
            if data_state is not None:
                data_name = storage.data_file_name(topo.dp_rank)
                entries[data_name] = storage.save_file(data_state, tmp / data_name)
            if topo.rank == 0:
                entries[CLIENT] = storage.save_file(client, tmp / CLIENT)
                entries["config.yaml"] = storage.save_text(self.cfg.to_yaml(), tmp / "config.yaml")

        error = storage.os_error(lambda: storage.fresh_directory(self.root, tmp)) if topo.rank == 0 else None
        dist.barrier(group=group)
        error = error or storage.os_error(write_files)
        if error:
            error = f"rank {topo.rank}: {error}"
        reports = [None] * topo.world_size
        dist.all_gather_object(reports, (entries, error), group=group)
        error = next((err for _, err in reports if err), None)
        if topo.rank == 0 and error is None:
            error = self._commit(tmp, final, client, {k: v for files, _ in reports for k, v in files.items()})
        if topo.rank == 0 and error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=group)
        error = outcome[0]
        if error is None:
            self._say(f"checkpoint saved: {final}")
            return None
        previous = storage.checkpoints_newest_first(self.root)
        kept = f"{previous[0]} is intact" if previous else "there is no earlier checkpoint"
        return f"checkpoint of step {step} failed ({error}); {kept}"

    def _client_state(self, step: int, tokens: int) -> dict:
        """Everything but the tensors and the data states, which have files of their own; a copy, as training goes on meanwhile."""
        scheduler = self.engine.lr_scheduler
        return {
            "version": fmt.FORMAT_VERSION,
            "step": step,
            "tokens": tokens,
            "adam_step": ds.adam_step(self.engine),
            "lr_scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
            "config": self.cfg.model_dump(mode="json"),
            "layout": self._layout(),
        }

    def _layout(self) -> dict:
        t = self.topo
        return {"world_size": t.world_size, "tp": t.tp, "ep": t.ep, "dp": t.dp, "pp": t.pp,
                "stage_layers": [len(layers) for layers in self.cfg.stage_layers()],
                "zero_stage": self.cfg.parallel.zero_stage}

    def _commit(self, tmp: Path, final: Path, client: dict, files: dict) -> Optional[str]:
        """Rank 0, once every rank's files are on disk: manifest, rename into place, move `latest`, prune."""
        manifest = {"version": fmt.FORMAT_VERSION, "step": client["step"], "tokens": client["tokens"],
                    "layout": client["layout"], "files": files}
        error = storage.os_error(lambda: storage.commit(tmp, final, manifest))
        if error:
            return f"rank 0: {error}"
        error = storage.os_error(lambda: storage.point_latest(final))
        if error:  # the checkpoint is committed all the same: a resume finds it by its manifest
            self._say(f"warning: {final} is saved, but {self.root / LATEST} still names the one before ({error})")
        storage.prune(self.root, self.cfg.checkpoint.keep)
        return None

    # --- resume ---

    def resume(self) -> Resumed:
        """Load the checkpoint checkpoint.resume names (auto: the most recently saved complete one) and say where
        to continue."""
        choice = self.cfg.checkpoint.resume
        if choice == "none":
            return Resumed()
        if choice != "auto":
            path = Path(choice)
            committed = [] if (path / MANIFEST).exists() else storage.checkpoints_newest_first(path)
            if committed:  # a checkpoint root was named
                path = committed[0]
            resumed, problem, _ = self._load(path)
            if problem:
                raise CheckpointError(f"cannot resume: {problem}; pass another checkpoint or --resume auto")
            return resumed
        partly_loaded = None  # a damaged checkpoint whose load wrote into the engine before the damage showed
        skipped = 0
        for path in storage.checkpoints_newest_first(self.root):
            resumed, problem, wrote_engine = self._load(path)
            if problem is None:
                return resumed
            self._say(f"warning: skipping checkpoint {path.name}: {problem}")
            skipped += 1
            partly_loaded = partly_loaded or (problem if wrote_engine else None)
        if partly_loaded:  # the engine is no longer the one built: starting afresh takes a new launch
            raise CheckpointError(f"cannot resume: {partly_loaded}, and no older checkpoint under {self.root} is "
                                  "usable; relaunch with --resume none to start afresh")
        if skipped:
            self._say(f"warning: no checkpoint under {self.root} is usable ({skipped} skipped): starting afresh at "
                      f"step 0; the skipped ones are pruned as new ones are saved (checkpoint.keep="
                      f"{self.cfg.checkpoint.keep})")
        return Resumed()

    def roll_back(self, before_step: int) -> Optional[Resumed]:
        """Load this run's most recently saved usable checkpoint of a step below `before_step` (a loss spike's
        rollback): None if there is none, the engine then untouched. Waits for a save in flight first."""
        if self._pending is not None:
            self._pending.wait()
        for path in storage.checkpoints_newest_first(self.root):
            if int(path.name[len("step-"):]) >= before_step:
                continue
            resumed, problem, wrote_engine = self._load(path)
            if problem is None:
                return resumed
            if wrote_engine:
                raise CheckpointError(f"cannot roll back: {problem}; the engine holds part of it. Relaunch, which "
                                      "resumes from the newest usable checkpoint")
            self._say(f"warning: cannot roll back to {path.name}: {problem}")
        return None

    def _load(self, path: Path) -> tuple[Optional[Resumed], Optional[str], bool]:
        """Load checkpoint `path` into the engine, the generators, the scheduler and the loader: where to go on
        from, or the one line saying why it cannot be used, the same on every rank, and whether the engine
        was written. Its files are verified first but for the blocks of the fragments, which each rank checks
        as it loads them; their verdict comes once every rank has loaded its part (the ranks are in the load's
        collectives together), and the engine then holds part of a damaged checkpoint: a full load of another
        overwrites all of it."""
        manifest, to_open, problem = self._verify_together(path)
        if problem:
            return None, problem, False
        client = storage.load_file(path / CLIENT)
        fmt.require_format(path, client.get("version"))
        check_same_model(path, client["config"], self.cfg.model)
        try:
            shards, problem = fmt.load_shards(path, manifest, to_open), None
        except CheckpointError as e:
            shards, problem = None, str(e)
        problem = self._agree(problem)
        if problem:
            return None, problem, False
        saved = fmt.SavedTensors(path, shards)
        fmt.restore(self.engine, self.topo, self.num_experts, saved, client["adam_step"])
        problem = self._agree(saved.problem)
        if problem:
            return None, problem, True
        same_world = client["layout"]["world_size"] == self.topo.world_size
        # The generators of this very rank, or rank 0's when the world changed size (every rank is seeded alike).
        _set_rng_state(shards[storage.shard_file_name(self.topo.rank if same_world else 0)]["rng"])
        if client["lr_scheduler"] is not None:
            scheduler = self.engine.lr_scheduler
            scheduler.load_state_dict(client["lr_scheduler"])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.engine.global_steps = client["step"]
        self.engine.global_samples = client["step"] * self.engine.train_batch_size()
        old = client["layout"]
        if self.loader is not None:  # None: weights only, to evaluate them
            self.loader.load_state_dict(SavedDataStates(path, old["dp"]))
        self._say(f"resumed from {path} at step {client['step']} (saved at tp={old['tp']} pp={old.get('pp', 1)} "
                  f"dp={old['dp']} zero={old['zero_stage']})")
        return Resumed(step=client["step"], tokens=client["tokens"], tensor_bytes_read=saved.bytes_read), None, True

    def _agree(self, problem: Optional[str]) -> Optional[str]:
        """The first rank's problem, on every rank; None if no rank has one."""
        problems = [None] * self.topo.world_size
        dist.all_gather_object(problems, problem, group=self.topo.control_group)
        return next((p for p in problems if p), None)

    def _verify_together(self, path: Path) -> tuple[Optional[dict], list[str], Optional[str]]:
        """The manifest, read once, the shards this rank opens, and what is wrong with the files, agreed by
        every rank: each rank checks its share of the small files whole, and the shards it opens by their size
        (it checks their blocks as it loads them), so no rank reads a byte of a shard it does not load."""
        try:
            manifest = storage.read_manifest(path)
            to_open = self._shards_to_open(manifest)
            problem = (storage.verify(path, self._files_to_verify(manifest), manifest)
                       or storage.verify(path, to_open, manifest, whole=False))
        except (OSError, ValueError, KeyError, TypeError):
            manifest, to_open, problem = None, [], f"{path / MANIFEST} is missing or unreadable"
        return manifest, to_open, self._agree(problem)

    def _files_to_verify(self, manifest: dict) -> list[str]:
        """This rank's share of the checkpoint's files other than shards: each is checked whole by one rank. At
        the saved DP size a DP rank's loader state is checked by its writer, which then reads it itself, from the
        page cache; the other files are dealt out."""
        topo = self.topo
        names = sorted(name for name in manifest["files"] if not name.startswith("shard-"))
        data_states = manifest["layout"]["dp"] == topo.dp
        own = storage.data_file_name(topo.dp_rank) if data_states and topo.writes_loader_state else None
        dealt = [name for name in names if not (data_states and name.startswith("data-"))]
        return [name for name in names if name == own] + dealt[topo.rank::topo.world_size]

    def _shards_to_open(self, manifest: dict) -> list[str]:
        """The shard files this rank loads from. At the saved layout, its own and those of the peers that write
        what it holds as well (layout_free.held_pieces): its TP group's, whose TP rank 0 writes the replicated
        parameters, on a last pipeline stage holding a copy of the tied embedding the first stage's, which
        write the embedding (partitioned over their DP group, not as the copy is), and at ZeRO-0 every rank's,
        as every DP replica holds every parameter. At another layout every shard, since only their indexes say
        which hold parts of what this rank keeps."""
        shards = sorted(name for name in manifest["files"] if name.startswith("shard-"))
        if manifest["layout"] != self._layout() or self.cfg.parallel.zero_stage == 0:
            return shards
        peers = set(dist.get_process_group_ranks(self.topo.tp_group))
        if any(ds.is_copy_across_stages(param) for param in self.engine.module.parameters()):
            peers |= set(range(self.topo.world_size // self.topo.pp))  # stage 0 (parallel/topology.py's rank order)
        return [storage.shard_file_name(rank) for rank in sorted({self.topo.rank, *peers})]


def check_same_model(path: Path, saved_config: dict, model: ModelConfig) -> None:
    """Refuse, in one line, a checkpoint of another model than the run's `model`. Where the
    step-0 weights came from (`init_from`) is not compared: the checkpoint's replace them, and a Hugging
    Face directory that has moved since must not stop the run from resuming."""
    ours = model.model_dump(mode="json")
    for key, value in saved_config["model"].items():
        if key != "init_from" and ours.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} has model.{key}={value} but this run has model.{key}={ours.get(key)}; "
                "resume with the model it was trained with, or --resume none to start afresh"
            )


class SavedDataStates(Sequence):
    """The loader states of a checkpoint's DP ranks, item r read from old DP rank r's file when first
    asked for: a loader resuming at the same layout asks only for its own."""

    def __init__(self, path: Path, dp: int):
        self.path, self.dp, self.read = path, dp, {}

    def __len__(self) -> int:
        return self.dp

    def __getitem__(self, dp_rank: int) -> dict:
        if not 0 <= dp_rank < self.dp:
            raise IndexError(dp_rank)
        if dp_rank not in self.read:
            self.read[dp_rank] = storage.load_file(self.path / storage.data_file_name(dp_rank))
        return self.read[dp_rank]


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
