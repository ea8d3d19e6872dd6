"""Issue 15's scenarios: the validation loss of the same weights at every layout.

The GPT's weights are the DP=2 checkpoints that scenarios_checkpoint.py trains for 10 steps (dense,
and with experts at EP=2), loaded at each layout as `parallax eval` loads them; the T5's are its
seeded initial weights, which are the same at every layout by construction and far from uniform.
Each rank evaluates its share of the same fixed windows.
"""
import os
from pathlib import Path

import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import VOCAB, fixed_batches, tiny_config
from tests.distributed.scenarios_checkpoint import layout, saved
from tests.distributed.scenarios_moe import MOE
from tests.distributed.scenarios_t5 import GLOBAL_BATCH as T5_GLOBAL_BATCH
from tests.distributed.scenarios_t5 import T5_V1_1, span_corrupted_batches, t5_config

EVAL_BATCHES = 2


def evaluate_at(cfg, batches) -> dict:
    """Build the model and engine at cfg's layout, load checkpoint.resume if it names one, and evaluate."""
    from launcher.evaluate import Evaluator
    from launcher.train import _seed_everything, build_model_and_engine
    from parallel.checkpoint import Checkpointer
    from parallel.pipeline import step_runner
    from parallel.topology import init_topology

    p = cfg.parallel
    topo = init_topology(tp=p.tp, ep=p.ep, pp=p.pp)
    _seed_everything(cfg.train.seed)
    _, engine = build_model_and_engine(cfg, topo, VOCAB, init_from=None)
    if cfg.checkpoint.resume != "none":
        Checkpointer(cfg, topo, engine, loader=None).resume()
    return Evaluator(topo, list(batches(topo)))(step_runner(engine, cfg, topo), step=10)


def gpt_eval(source: str, *overrides: str) -> dict:
    cfg = tiny_config(saved(source), f"train.steps={EVAL_BATCHES}", *overrides)
    return evaluate_at(cfg, fixed_batches(cfg))


def t5_eval(*overrides: str) -> dict:
    cfg = t5_config(*T5_V1_1, f"train.steps={EVAL_BATCHES}", "checkpoint.resume=none", *overrides)
    return evaluate_at(cfg, span_corrupted_batches(cfg))


def switch_t5(ep: int, dp: int) -> tuple[str, ...]:
    return ("model.moe={num_experts: 4, every: 2, top_k: 1, capacity_factor: 4.0, eval_capacity_factor: 4.0}",
            f"parallel.ep={ep}", f"train.micro_batch_size={T5_GLOBAL_BATCH // dp}")


# --- one process: the references ------------------------------------------------------------------

@scenario(world_size=1, reads_from=2)
def eval_gpt_reference():
    return gpt_eval("dp2-zero1", *layout(1, 1, 1))


@scenario(world_size=1, reads_from=2)
def eval_gpt_moe_reference():
    return gpt_eval("ep2-zero1", MOE, "parallel.ep=1", *layout(1, 1, 1))


@scenario(world_size=1)
def eval_t5_reference():
    return t5_eval()


@scenario(world_size=1)
def eval_switch_t5_reference():
    return t5_eval(*switch_t5(ep=1, dp=1))


# --- two ranks (after scenarios_checkpoint.py's, in the same launch) -------------------------------

@scenario(world_size=2)
def eval_gpt_tp2():
    return gpt_eval("dp2-zero1", *layout(2, 1, 1))


@scenario(world_size=2)
def eval_gpt_tp2_sequence_parallel():
    return gpt_eval("dp2-zero1", *layout(2, 1, 1), "parallel.sequence_parallel=true")


@scenario(world_size=2)
def eval_gpt_dp2_zero3():
    return gpt_eval("dp2-zero1", *layout(1, 2, 3))


@scenario(world_size=2)
def eval_gpt_moe_ep2():
    return gpt_eval("ep2-zero1", MOE, "parallel.ep=2", *layout(1, 2, 1))


@scenario(world_size=2)
def eval_t5_tp2():
    return t5_eval("parallel.tp=2")


@scenario(world_size=2)
def eval_t5_dp2_zero3():
    return t5_eval("parallel.zero_stage=3", f"train.micro_batch_size={T5_GLOBAL_BATCH // 2}")


@scenario(world_size=2)
def eval_switch_t5_ep2():
    return t5_eval(*switch_t5(ep=2, dp=2))


# --- four ranks ----------------------------------------------------------------------------------

@scenario(world_size=4, reads_from=2)
def eval_gpt_tp2_dp2():
    return gpt_eval("dp2-zero1", *layout(2, 2, 2))


@scenario(world_size=4)
def eval_t5_tp2_dp2():
    return t5_eval("parallel.tp=2", f"train.micro_batch_size={T5_GLOBAL_BATCH // 2}", "parallel.zero_stage=2")


# --- evaluation inside training, through the real data pipeline -----------------------------------

def id_data() -> tuple[str, ...]:
    """A corpus of 120 documents whose tokens name their document, a quarter of them held out."""
    from parallel.topology import init_topology
    from tests.data.corpora import write_id_corpus, write_id_tokenizer

    init_topology(tp=1)  # joins the process group the barrier below needs
    root = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "eval-data"
    if dist.get_rank() == 0 and not root.exists():
        write_id_corpus(root / "corpus", 10, 12)
        write_id_tokenizer(root / "tokenizer.json", 120)
    dist.barrier()
    # A shuffle buffer smaller than the corpus: a resumed loader re-reads its buffer's documents, shard by shard.
    return (f"data.sources=[{{path: {root / 'corpus'}}}]", f"data.tokenizer={root / 'tokenizer.json'}",
            "data.validation_fraction=0.25", "data.shuffle_buffer=16", "train.eval_batches=2")


def run_with_data(name: str, *overrides: str) -> list[dict]:
    """A DP=3 ZeRO-1 run of 6 steps on the id corpus; its records, the evaluations' among them."""
    from launcher.stopping import StopRequested
    from launcher.train import train

    run_dir = Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "eval-runs" / name
    cfg = tiny_config(*id_data(), "train.steps=6", "logging.interval=1", "checkpoint.interval=0",
                      f"logging.run_dir={run_dir}", *layout(1, 3, 1), *overrides)
    records = []
    try:
        train(cfg, records=records)
    except StopRequested:
        pass
    return records


@scenario(world_size=3)
def evaluation_in_training():
    """The same run without evaluation, with it every 2 steps, and with it stopped after step 3 and resumed.

    Three ranks, a launch of its own: in the long-lived 2-rank launch, after some fifty scenarios, the
    data pipeline's reads ran a hundred times slower than in a fresh process."""
    return {"without": run_with_data("without", "train.eval_interval=0"),
            "with": run_with_data("with", "train.eval_interval=2"),
            "stopped": run_with_data("resumed", "train.eval_interval=2", "train.stop_at_step=3"),
            "resumed": run_with_data("resumed", "train.eval_interval=2")}
