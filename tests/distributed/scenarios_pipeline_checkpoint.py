"""Issue 25 point 5 (and the data pipeline of point 6): checkpoints stay layout-free under pipeline parallelism.

The 4-layer tiny GPT (tied embedding: the last stage holds a copy) trains on the checkpoint scenarios'
fixed global batches for 20 steps, saving at step 10, at PP=2 (two ranks), at PP=1 DP=2 (two ranks) and at
PP=4 (four ranks). Each step-10 checkpoint is reloaded at another pipeline size (PP=2 -> PP=1, PP=1 -> PP=2,
PP=2 -> PP=4, PP=4 -> PP=2 x DP=2) and trained on to step 20. A PP=2 x DP=2 run on the real data pipeline
stops at train.stop_at_step and resumes.
"""
import os
from pathlib import Path

import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import GLOBAL_BATCH, VOCAB, tiny_config, train_records
from tests.distributed.scenarios_checkpoint import (CHECKSUM_BLOCK_BYTES, SAVED_AT, STEPS, RecordingLoader,
                                                    ResumableBatches, full_tensor, layout, run_dir, saved, saved_path,
                                                    straight_and_resumed, train_run)

FOUR_LAYERS = "model.num_layers=4"
KEYS = ("param", "exp_avg", "exp_avg_sq")


def pipeline(pp: int, dp: int = 1) -> tuple[str, ...]:
    """PP stages of DP replicas at ZeRO-1, on the global batch of 8: 4 micro-batches of 2 at DP=1, 2 at DP=2."""
    accum = 4 // dp
    return (FOUR_LAYERS, f"parallel.pp={pp}", f"train.micro_batch_size={GLOBAL_BATCH // dp // accum}",
            f"train.grad_accum={accum}", "parallel.zero_stage=1")


PP1 = (FOUR_LAYERS, *layout(1, 2, 1))  # PP=1 at DP=2, ZeRO-1


def reloaded_model(source: str, *overrides: str) -> dict:
    """Load `source`'s step-10 checkpoint at this layout as training does (each rank builds its stage), and
    bring to rank 0 every full tensor the ranks hold, asked of DeepSpeed itself (scenarios_checkpoint's
    witness), by name: `tensors` holds each parameter as the stage that owns it holds it, `tied_copy` the
    last stage's copy of the tied embedding (None without one), `held_twice` any other name two stages hold."""
    from launcher.train import build_model_and_engine
    from parallel.checkpoint import Checkpointer
    from parallel.checkpoint.deepspeed_adapter import is_copy_across_stages
    from parallel.topology import init_topology

    cfg = tiny_config(f"train.steps={STEPS}", saved(source), *overrides)
    p = cfg.parallel
    topo = init_topology(tp=p.tp, ep=p.ep, pp=p.pp)
    _, engine = build_model_and_engine(cfg, topo, VOCAB, init_from=None)  # drawn weights, overwritten by the load
    Checkpointer(cfg, topo, engine, ResumableBatches(cfg, topo)).resume()
    mine = [(name, is_copy_across_stages(param), {key: full_tensor(engine, topo, param, key) for key in KEYS})
            for name, param in engine.module.named_parameters()]
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, (topo.tp_rank, topo.dp_rank, mine), group=topo.control_group)
    tensors, tied_copy, held_twice = {}, None, []
    for tp_rank, dp_rank, held in everyone:
        if tp_rank or dp_rank:  # full tensors: every TP and DP rank of a stage holds the same
            continue
        for name, copy, values in held:
            if copy:
                tied_copy = values
            elif name in tensors:
                held_twice.append(name)
            else:
                tensors[name] = values
    return {"tensors": tensors, "tied_copy": tied_copy, "held_twice": held_twice}


def reshard(source: str, name: str, *overrides: str) -> dict:
    """`source`'s step-10 checkpoint at another layout: what the reload holds, and steps 11-20 from it (run `name`)."""
    return {"checkpoint": str(saved_path(source)), **reloaded_model(source, *overrides),
            "curve": train_run(name, saved(source), *overrides)}


class CountedBatches(ResumableBatches):
    """Remembers whether the training loop iterated it: a pipeline stage between the ends must not."""

    iterated = False

    def __iter__(self):
        self.iterated = True
        yield from super().__iter__()


def straight_and_resumed_counted(name: str, *overrides: str) -> dict:
    """straight_and_resumed, and which pipeline ranks iterated their batch source, and the files of the step-10
    checkpoint (data-*.pt: the loader states, one per DP rank, written by the first stage)."""
    from parallel.checkpoint import read_manifest
    from parallel.topology import init_topology

    sources = []

    def counted(cfg):
        def source(topo):
            sources.append(CountedBatches(cfg, topo))
            return sources[-1]
        return source

    cfg = tiny_config(f"train.steps={STEPS}", f"checkpoint.interval={SAVED_AT}", f"logging.run_dir={run_dir(name)}",
                      f"checkpoint.checksum_block_bytes={CHECKSUM_BLOCK_BYTES}", "checkpoint.resume=none", *overrides)
    straight = train_records(cfg, batches=counted(cfg))
    topo = init_topology(tp=cfg.parallel.tp, ep=cfg.parallel.ep, pp=cfg.parallel.pp)
    iterated = [None] * topo.world_size
    dist.all_gather_object(iterated, (topo.pp_rank, sources[0].iterated), group=topo.control_group)
    resumed = train_run(f"{name}-resumed", saved(name), *overrides)
    return {"straight": straight, "resumed": resumed, "iterated": iterated,
            "files": sorted(read_manifest(saved_path(name))["files"])}


# --- two ranks: exact resume at PP=2, and PP=2 <-> PP=1 ---------------------------------------------

@scenario(world_size=2)
def exact_resume_pp2():
    """20 steps at PP=2 saving at step 10 (the checkpoint the reshards below read), then again from step 10."""
    return straight_and_resumed("pp2", *pipeline(pp=2))


@scenario(world_size=2)
def four_layers_at_pp1():
    """The same model at PP=1 (DP=2): the checkpoint the PP=1 -> PP=2 reshard reads, and its curve."""
    return {"straight": train_run("pp1", "checkpoint.resume=none", *PP1)}


@scenario(world_size=2)
def reshard_pp2_to_pp1():
    return reshard("pp2", "pp2-to-pp1", *PP1)


@scenario(world_size=2)
def reshard_pp1_to_pp2():
    return reshard("pp1", "pp1-to-pp2", *pipeline(pp=2))


# --- four ranks: PP=4 <-> PP=2 ---------------------------------------------------------------------

@scenario(world_size=4)
def exact_resume_pp4():
    """At PP=4 the two stages between the ends read no batches; only the first stage saves the loader state."""
    return straight_and_resumed_counted("pp4", *pipeline(pp=4))


@scenario(world_size=4)
def reshard_pp4_to_pp2_dp2():
    return reshard("pp4", "pp4-to-pp2-dp2", *pipeline(pp=2, dp=2))


@scenario(world_size=4, reads_from=2)
def reshard_pp2_to_pp4():
    return reshard("pp2", "pp2-to-pp4", *pipeline(pp=4))


# --- four ranks: the real data pipeline at PP=2 x DP=2, stopped by train.stop_at_step and resumed ---

def real_data_run(name: str, *overrides: str) -> dict:
    """6 steps of the 4-layer GPT at PP=2 x DP=2 on the id corpus through the real data loader, evaluating
    every 2 steps. Its records, and per rank (pp_rank, dp_rank, the batches its loader handed out)."""
    from data_pipeline import build_dataloader
    from launcher.stopping import StopRequested
    from launcher.train import train
    from tests.distributed.scenarios_eval import id_data

    data = id_data()
    cfg = tiny_config(*data, "train.steps=6", "logging.interval=1", "checkpoint.interval=0", "train.eval_interval=2",
                      f"logging.run_dir={Path(os.environ['PARALLAX_SCENARIO_DIR']) / 'pp-data-runs' / name}",
                      *pipeline(pp=2, dp=2), *overrides)
    loaders, records = [], []

    def source(topo):
        loaders.append((topo, RecordingLoader(build_dataloader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
            seed=cfg.train.seed))))
        return loaders[-1][1]
    try:
        train(cfg, batches=source, records=records)
    except StopRequested:
        pass
    topo, loader = loaders[0]
    everyone = [None] * topo.world_size
    dist.all_gather_object(everyone, (topo.pp_rank, topo.dp_rank, loader.batches), group=topo.control_group)
    return {"records": records, "batches": everyone}


@scenario(world_size=4)
def real_data_stopped_and_resumed_at_pp2_dp2():
    from parallel.checkpoint import checkpoints_newest_first, read_manifest

    straight = real_data_run("straight")
    stopped = real_data_run("stopped", "train.stop_at_step=3")
    root = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "pp-data-runs" / "stopped" / "checkpoints"
    files = sorted(read_manifest(checkpoints_newest_first(root)[0])["files"])
    resumed = real_data_run("stopped")
    return {"straight": straight, "stopped": stopped, "resumed": resumed, "files": files}
