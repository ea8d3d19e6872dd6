"""Issue 4's distributed scenarios: exact resume at one layout, and resharding onto another.

Every run trains the parity scenarios' tiny GPT on the same global batches for 20 steps. A DP=2
run saves at step 10 and 20 under $PARALLAX_SCENARIO_DIR; the other layouts (TP=2, DP=1, DP=4, in
this world-size launch or a later one) reload its step-10 checkpoint and continue.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import GLOBAL_BATCH, VOCAB, fixed_batches, tiny_config

STEPS, SAVED_AT = 20, 10


class ResumableBatches:
    """The parity scenarios' fixed global batches behind the data loader's checkpoint interface.

    Its state is the number of global steps drawn, which means the same thing at every DP size.
    """

    def __init__(self, cfg, topo):
        self.cfg, self.topo, self.steps_drawn = cfg, topo, 0

    def __iter__(self):
        accum = self.cfg.train.grad_accum
        for i, batch in enumerate(fixed_batches(self.cfg)(self.topo)):
            if i >= self.steps_drawn * accum:
                if (i + 1) % accum == 0:  # counted before the yield: the loop saves before asking for more
                    self.steps_drawn += 1
                yield batch

    def state_dict(self) -> dict:
        return {"dp_rank": self.topo.dp_rank, "steps_drawn": self.steps_drawn}

    def load_state_dict(self, states: list[dict]) -> None:
        assert [s["dp_rank"] for s in states] == list(range(len(states))), "every old DP rank's state, in order"
        self.steps_drawn = states[0]["steps_drawn"]


def run_dir(name: str) -> Path:
    return Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "checkpoint-runs" / name


def layout(tp: int, dp: int, zero: int) -> tuple[str, ...]:
    return (f"parallel.tp={tp}", f"train.micro_batch_size={GLOBAL_BATCH // dp}", f"parallel.zero_stage={zero}")


def train_run(name: str, *overrides: str) -> list[dict]:
    from launcher.train import train

    cfg = tiny_config(f"train.steps={STEPS}", f"checkpoint.interval={SAVED_AT}", f"logging.run_dir={run_dir(name)}",
                      *overrides)
    return train(cfg, batches=lambda topo: ResumableBatches(cfg, topo))


def saved_path(name: str) -> Path:
    return run_dir(name) / "checkpoints" / f"step-{SAVED_AT:08d}"


def saved(name: str) -> str:
    return f"checkpoint.resume={saved_path(name)}"


def straight_and_resumed(name: str, *layout_overrides: str) -> dict:
    """20 steps straight (saving at step 10), then the same layout again from that step-10 checkpoint."""
    straight = train_run(name, "checkpoint.resume=none", *layout_overrides)
    resumed = train_run(f"{name}-resumed", saved(name), *layout_overrides)
    return {"straight": straight, "resumed": resumed}


def reloaded_tensors(source: str, *layout_overrides: str) -> dict:
    """Load `source`'s step-10 checkpoint at this layout and gather every full tensor back to rank 0."""
    from models.gpt import GPT
    from parallel.checkpoint import Checkpointer
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    cfg = tiny_config(f"train.steps={STEPS}", saved(source), *layout_overrides)
    topo = init_topology(tp=cfg.parallel.tp)
    engine = build_engine(GPT(cfg.model, VOCAB), cfg, topo)  # initial weights are overwritten by the load
    checkpointer = Checkpointer(cfg, topo, engine, ResumableBatches(cfg, topo))
    checkpointer.resume()
    mine = checkpointer._gather_tensors()
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, mine)
    return {name: value for part in everyone for name, value in part.items()}


# --- two ranks: exact resume at each layout, and the TP reshards ---------------------------------

@scenario(world_size=2)
def exact_resume_dp2_zero0():
    return straight_and_resumed("dp2-zero0", *layout(1, 2, 0))


@scenario(world_size=2)
def exact_resume_dp2_zero1():
    return straight_and_resumed("dp2-zero1", *layout(1, 2, 1))


@scenario(world_size=2)
def exact_resume_dp2_zero2():
    return straight_and_resumed("dp2-zero2", *layout(1, 2, 2))


@scenario(world_size=2)
def exact_resume_dp2_zero3():
    return straight_and_resumed("dp2-zero3", *layout(1, 2, 3))


@scenario(world_size=2)
def exact_resume_tp2():
    return straight_and_resumed("tp2-zero1", *layout(2, 1, 1))


def reshard(source: str, *layout_overrides: str) -> dict:
    """Reload `source`'s step-10 checkpoint at another layout: the tensors it holds, and steps 11-20 from it."""
    return {"checkpoint": str(saved_path(source)), "tensors": reloaded_tensors(source, *layout_overrides),
            "curve": train_run(f"{source}-resharded", saved(source), *layout_overrides)}


@scenario(world_size=2)
def reshard_tp2_to_tp1():
    return reshard("tp2-zero1", *layout(1, 2, 1))


@scenario(world_size=2)
def reshard_tp1_to_tp2():
    return reshard("dp2-zero1", *layout(2, 1, 1))


# --- one and four ranks: the DP reshards of the DP=2 checkpoints -----------------------------------

def reshard_dp(zero: int, dp: int) -> dict:
    return reshard(f"dp2-zero{zero}", *layout(1, dp, zero))


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero1():
    return reshard_dp(1, 1)


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero2():
    return reshard_dp(2, 1)


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero3():
    return reshard_dp(3, 1)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero1():
    return reshard_dp(1, 4)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero2():
    return reshard_dp(2, 4)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero3():
    return reshard_dp(3, 4)


def read_full_tensors(path: Path) -> dict:
    """The pytest side: every parameter's full tensors straight from the checkpoint's files."""
    return {name: value for shard in sorted(path.glob("shard-*.pt"))
            for name, value in torch.load(shard, weights_only=True)["tensors"].items()}
