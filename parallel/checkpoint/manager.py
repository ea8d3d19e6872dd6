"""The Checkpointer: the object the training loop calls to resume a run and to save it.

Reports, agreements and loader states travel on the topology's gloo control group, never on the
NCCL data plane (parallel/topology.py). When to save, and what a failed save means, is the training
loop's decision (launcher/train.py): this module only saves and loads.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from parallel.checkpoint import deepspeed_adapter as ds
from parallel.checkpoint import layout_free as fmt
from parallel.checkpoint import storage
from parallel.checkpoint.storage import CLIENT, LATEST, MANIFEST, CheckpointError, step_dir_name


@dataclass(frozen=True)
class Resumed:
    step: int = 0
    tokens: int = 0


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


class Checkpointer:
    """Saves and resumes one run's checkpoints; every method is collective over all ranks.

    `loader` is the batch source: its `state_dict()` per DP rank is saved, and its
    `load_state_dict(states)` receives the states of every DP rank of the saved run, so it can
    reshard them onto a different DP size. Without one (evaluation), resume restores the model only.
    """

    def __init__(self, cfg, topo, engine, loader):
        ds.check_deepspeed_version()
        self.cfg, self.topo, self.engine, self.loader = cfg, topo, engine, loader
        self.root = checkpoint_root(cfg)
        self.num_experts = cfg.model.moe.num_experts if cfg.model.moe else 0

    def _say(self, line: str) -> None:
        if self.topo.is_logging_rank:
            print(f"parallax: {line}", flush=True)

    # --- save ---

    def save(self, step: int, tokens: int) -> Optional[str]:
        """Write and commit the checkpoint of `step`. On a disk failure, the same one line on every
        rank saying what failed and what is left; the previous checkpoint is untouched."""
        topo, name, control = self.topo, step_dir_name(step), self.topo.control_group
        tmp, final = self.root / f".{name}.tmp", self.root / name
        pieces = fmt.held_pieces(self.engine, topo, self.num_experts)
        data_states = self._gather_data_states()  # a collective: every rank must reach it, whatever its disk does
        entries = {}

        def write_files():
            shard = f"shard-{topo.rank:05d}.pt"
            entries[shard] = storage.save_file({"pieces": pieces, "rng": _rng_state()}, tmp / shard)
            if topo.rank == 0:
                entries[CLIENT] = storage.save_file(self._client_state(step, tokens, data_states), tmp / CLIENT)
                entries["config.yaml"] = storage.save_text(self.cfg.to_yaml(), tmp / "config.yaml")

        error = storage.os_error(lambda: storage.fresh_directory(self.root, tmp)) if topo.rank == 0 else None
        dist.barrier(group=control)
        error = error or storage.os_error(write_files)
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
        previous = storage.checkpoint_steps(self.root)
        kept = f"{self.root / step_dir_name(previous[0])} is intact" if previous else "there is no earlier checkpoint"
        return f"checkpoint of step {step} failed ({error}); {kept}"

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
            "version": fmt.FORMAT_VERSION,
            "step": step,
            "tokens": tokens,
            "adam_step": ds.adam_step(self.engine),
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
        manifest = {"version": fmt.FORMAT_VERSION, "step": step, "tokens": tokens, "layout": self._layout(),
                    "files": files}
        error = storage.os_error(lambda: storage.commit(tmp, final, manifest))
        if error:
            return f"rank 0: {error}"
        storage.prune(self.root, self.cfg.checkpoint.keep)
        return None

    # --- resume ---

    def resume(self) -> Resumed:
        """Load the checkpoint checkpoint.resume names (auto: the newest complete one) and say where to continue."""
        path = self._choose()
        if path is None:
            return Resumed()
        client = torch.load(path / CLIENT, weights_only=True)
        self._check_same_model(path, client["config"])
        shards = fmt.load_shards(path)
        fmt.restore(self.engine, self.topo, self.num_experts, path, shards, client["adam_step"])
        same_world = client["layout"]["world_size"] == self.topo.world_size
        # The generators of this very rank, or rank 0's when the world changed size (every rank is seeded alike).
        _set_rng_state(shards[self.topo.rank if same_world else 0]["rng"])
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
        for step in storage.checkpoint_steps(self.root):
            path = self.root / step_dir_name(step)
            problem = self._verify_together(path)
            if problem is None:
                return path
            self._say(f"warning: skipping checkpoint {path.name}: {problem}")
        return None

    def _verify_together(self, path: Path) -> Optional[str]:
        """Every rank checks its share of the files, so a large checkpoint verifies in parallel."""
        try:
            names = sorted(storage.read_manifest(path)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            names = None
        problem = storage.verify(path, names[self.topo.rank::self.topo.world_size] if names is not None else None)
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
