"""Issue 25's proof: a pipeline-parallel layout computes what one process computes.

Each layout trains the tiny GPT of scenarios.py for 5 steps on the same global batches as the one-process
reference, cut into train.grad_accum micro-batches that flow through the stages; the 4-stage and
interleaved layouts need 4 layers, and compare with a 4-layer reference.
"""
import torch
import torch.distributed as dist

from tests.distributed.harness import scenario
from tests.distributed.scenarios import LLAMA_STYLE, VOCAB, fixed_batches, run_training, tiny_config
from tests.distributed.scenarios_moe import MOE, NO_AUX, STEPS

FOUR_LAYERS = "model.num_layers=4"
# 4 micro-batches of 2 sequences: the reference's global batch of 8, through a pipeline
PIPELINED = ("train.micro_batch_size=2", "train.grad_accum=4", "parallel.zero_stage=1")


@scenario(world_size=1)
def reference_training_four_layers():
    return run_training("parallel.zero_stage=0", FOUR_LAYERS)


@scenario(world_size=2)
def pp2_training():
    return run_training(*PIPELINED, "parallel.pp=2")


@scenario(world_size=2)
def pp2_zero0_training():
    return run_training(*PIPELINED, "parallel.pp=2", "parallel.zero_stage=0")


@scenario(world_size=2)
def pp2_interleaved_training():
    return run_training(*PIPELINED, "parallel.pp=2", "parallel.virtual_stages=2", FOUR_LAYERS)


@scenario(world_size=2)
def pp2_training_llama_style():
    return run_training(*PIPELINED, "parallel.pp=2", *LLAMA_STYLE)


@scenario(world_size=2)
def pp2_activation_checkpointing_training():
    return run_training(*PIPELINED, "parallel.pp=2", "parallel.activation_checkpointing=true")


@scenario(world_size=2)
def pp2_bf16_training():
    return run_training(*PIPELINED, "parallel.pp=2", "train.precision=bf16")


@scenario(world_size=4)
def pp2_tp2_sequence_parallel_training():
    return run_training(*PIPELINED, "parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true")


@scenario(world_size=4)
def pp2_dp2_zero1_training():
    return run_training("train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=1", "parallel.pp=2")


@scenario(world_size=4)
def pp4_training():
    return run_training(*PIPELINED, "parallel.pp=4", FOUR_LAYERS)


@scenario(world_size=4)
def moe_pp2_ep2_training():
    """The router's z-loss of the first stage's MoE layer rides the pipeline to the last stage's loss."""
    return run_training(MOE, NO_AUX, STEPS, "train.micro_batch_size=2", "train.grad_accum=2", "parallel.zero_stage=1",
                        "parallel.pp=2", "parallel.ep=2")


@scenario(world_size=2)
def dp2_zero1_bf16_grad_accum_training():
    """bf16 without a pipeline, with the pipelined layouts' micro-batches: what their bf16 runs must match."""
    return run_training("train.micro_batch_size=1", "train.grad_accum=4", "parallel.zero_stage=1",
                        "train.precision=bf16")



@scenario(world_size=2)
def pp2_tied_embedding_copies():
    """Three pipelined steps of the tied GPT, driven as the loop drives them: whether the first stage's
    embedding and the last stage's copy are still the same bits (and have moved), and the parameter
    count the run reports (every stage's, the copy once) beside the whole model's."""
    from launcher.train import _seed_everything, build_model_and_engine
    from models.gpt import GPT
    from parallel.pipeline import step_runner, whole_model_parameter_counts
    from parallel.topology import init_topology

    cfg = tiny_config(*PIPELINED, "parallel.pp=2")
    topo = init_topology(tp=1, pp=2)
    _seed_everything(cfg.train.seed)
    model, engine = build_model_and_engine(cfg, topo, VOCAB, init_from=None)
    initial = model.embedding.weight.detach().clone()
    runner, batches = step_runner(engine, cfg, topo), iter(fixed_batches(cfg)(topo))
    for _ in range(3):
        runner.train_step([model.batch_inputs(next(batches)) for _ in range(cfg.train.grad_accum)])
    copies = [torch.empty_like(initial) for _ in range(2)]
    dist.all_gather(copies, model.embedding.weight.detach(), group=topo.embedding_group)
    return {"equal": torch.equal(*copies), "moved": not torch.equal(initial, copies[0]),
            "counts": whole_model_parameter_counts(model, topo), "whole_model": GPT(cfg.model, VOCAB).parameter_counts()}


# --- evaluation: the held-out loss of the same weights (scenarios_eval.py's checkpoint) -------------------

def _eval_at(*overrides: str) -> dict:
    from tests.distributed.scenarios_eval import gpt_eval

    return gpt_eval("dp2-zero1", *overrides)


@scenario(world_size=2)
def eval_gpt_pp2():
    """Each global batch as 2 micro-batches of 4 sequences: the forward-only schedule's groups of pp."""
    return _eval_at("parallel.pp=2", "train.micro_batch_size=4", "train.grad_accum=2", "parallel.zero_stage=1")


@scenario(world_size=4, reads_from=2)
def eval_gpt_pp2_tp2_sequence_parallel():
    return _eval_at("parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1")
