"""Issue 8: `parallax plan` counts the real model on the meta device, plans memory and step time, and
reproduces published facts (GPT-3 and T-NLG sizes, T-NLG's V100 layout, a real engine's memory)."""
import re
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import load_config
from launcher.plan.count import built_count, closed_form_count
from launcher.plan.hardware import Cluster
from launcher.plan.layout import advice, plan, search
from launcher.plan.memory import activation_bytes
from launcher.plan.throughput import dp_bytes_per_step
from tests.distributed.scenarios_plan import MEMORY_CASES, MODEL

PUBLISHED = sorted(p for p in Path("configs").glob("*.yaml") if not p.stem.endswith("-tiny"))  # -tiny: CPU-sized
TNLG = "configs/tnlg-17b.yaml"
DGX2_X16 = Cluster.of(16, 16, "v100")  # T-NLG's 256 V100-32GB


def closed_form_plan(cfg, cluster):
    """Plan without the meta build (tested on its own below), to keep the suite fast."""
    return plan(cfg, cluster, count=closed_form_count(cfg.model, cfg.model.vocab_size, cfg.parallel.tp))


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("arch", [(), ("model.position_embedding=rotary", "model.norm=rmsnorm")])
def test_meta_build_matches_the_closed_form(tp, arch):
    m = load_config(None, ["model.num_layers=3", "model.hidden_size=128", "model.num_heads=8",
                           "model.ffn_hidden_size=320", "model.vocab_size=1000", *arch]).model
    built = built_count(m, 1000, tp)
    assert built == closed_form_count(m, 1000, tp)
    assert built.total == closed_form_count(m, 1000, 1).per_rank  # every shard counted once
    assert (built.per_rank < built.total) == (tp > 1)


def test_published_sizes_counted_on_the_meta_device():
    tnlg, gpt3 = load_config(TNLG), load_config("configs/gpt3-175b.yaml")
    tnlg_count = built_count(tnlg.model, 50257, tnlg.parallel.tp)
    gpt3_count = built_count(gpt3.model, 50257, gpt3.parallel.tp)
    assert abs(tnlg_count.total / 17e9 - 1) < 0.02, tnlg_count
    assert abs(gpt3_count.total / 175e9 - 1) < 0.01, gpt3_count
    assert gpt3_count.per_rank == pytest.approx(gpt3_count.total / 8, rel=0.01)  # TP=8 splits nearly all


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.stem)
def test_every_config_fits_the_cluster_its_comment_states(path):
    command = re.search(r"parallax plan \S+ --nodes (\d+) --gpus-per-node (\d+) --gpu (\S+)", path.read_text())
    assert command, f"{path} must state its cluster as a `parallax plan` command line"
    nodes, gpus_per_node, gpu = command.groups()
    cfg = load_config(path)
    assert closed_form_plan(cfg, Cluster.of(int(nodes), int(gpus_per_node), gpu)).fits


def test_tnlg_needs_model_parallelism_on_32gb_v100s():
    """Published set-up: TP=4 plus ZeRO-1 on DGX-2 V100-32GB. Assumed: fp16, sequence 1024, full
    activation checkpointing (as the T-NLG blog describes), global batch 512, micro-batch 8 at DP=64."""
    cfg = load_config(TNLG)
    assert (cfg.parallel.tp, cfg.parallel.zero_stage, cfg.data.seq_len) == (4, 1, 1024)
    published = closed_form_plan(cfg, DGX2_X16)
    assert published.fits and published.dp == 64 and published.global_batch == 512
    for tp in (1, 2):  # one model replica per GPU (and two per pair) do not fit, even at micro-batch 1
        unsplit = closed_form_plan(load_config(TNLG, [f"parallel.tp={tp}", "train.micro_batch_size=1"]), DGX2_X16)
        assert not unsplit.fits
        assert unsplit.memory.parameters + unsplit.memory.gradients > DGX2_X16.usable_bytes
    fixes = dict(advice(closed_form_plan(load_config(TNLG, ["parallel.tp=1", "train.micro_batch_size=2"]), DGX2_X16)))
    assert "parallel.tp=4 train.grad_accum=4" in fixes and fixes["parallel.tp=4 train.grad_accum=4"].fits
    assert "parallel.zero_stage=3" in fixes  # partitioning the fp16 weights too is the other way out


def test_search_ranks_fitting_layouts_fastest_first():
    ranked = search(closed_form_plan(load_config(TNLG), DGX2_X16))
    assert ranked and all(p.fits for p in ranked)
    assert [p.step.seconds for p in ranked] == sorted(p.step.seconds for p in ranked)
    assert all(p.global_batch == 512 for p in ranked)
    # Unsplit fp16 weights alone fill a V100; split in two they fit once ZeRO-2 partitions the gradients.
    assert not [p for p in ranked if p.cfg.parallel.tp == 1 and p.cfg.parallel.zero_stage < 3]
    assert {p.cfg.parallel.zero_stage for p in ranked if p.cfg.parallel.tp == 2} == {2, 3}
    assert any(p.layout() == "tp=4 dp=64 zero=1 sp=off checkpointing=on micro-batch=8 grad-accum=1" for p in ranked)


def test_model_states_match_a_real_engine_within_15_percent(scenario_results):
    measured = scenario_results("plan_measured_memory")
    for name, overrides in MEMORY_CASES.items():
        cfg = load_config(None, [*MODEL, "model.max_seq_len=32", "data.seq_len=32", *overrides])
        planned = closed_form_plan(cfg, Cluster.of(1, 1, "a100")).memory.model_states
        assert measured[name] == pytest.approx(planned, rel=0.15), (name, measured[name], planned)


def test_flops_are_six_per_parameter_per_token_plus_attention():
    """Kaplan et al.'s 6N per token, from the parameter count, against Megatron's FLOP count."""
    cfg = load_config("configs/gpt3-175b.yaml")
    p = closed_form_plan(cfg, Cluster.of(128, 8, "a100"))
    m, s = cfg.model, cfg.data.seq_len
    attention = 12 * m.num_layers * s * m.hidden_size  # QK^T and AV, forward and backward
    assert p.step.model_flops / p.step.tokens == pytest.approx(6 * p.count.total + attention, rel=0.005)
    assert p.step.hardware_flops / p.step.model_flops == pytest.approx(4 / 3, rel=0.01)  # recomputed forward


def test_zero3_communicates_one_and_a_half_times_plain_data_parallel():
    """The ZeRO paper: stages 1-2 move what DP's all-reduce moves, stage 3 1.5x (one micro-batch)."""
    count = closed_form_count(load_config(TNLG).model, 50257, 4)
    volumes = [dp_bytes_per_step(load_config(TNLG, [f"parallel.zero_stage={stage}"]), count, 64)
               for stage in range(4)]
    assert volumes[0] == volumes[1] == volumes[2] == pytest.approx(2 * 63 / 64 * count.per_rank * 2)
    assert volumes[3] == pytest.approx(1.5 * volumes[0])


def test_sequence_parallelism_splits_every_activation_over_tp():
    base = ["model.vocab_size=50257", "train.micro_batch_size=2"]
    one = activation_bytes(load_config(TNLG, [*base, "parallel.tp=1"]), 50257)
    split = activation_bytes(load_config(TNLG, [*base, "parallel.tp=4", "parallel.sequence_parallel=true"]), 50257)
    tp_only = activation_bytes(load_config(TNLG, [*base, "parallel.tp=4"]), 50257)
    assert split == pytest.approx(one / 4) and split < tp_only < one


def test_cli_plans_tnlg_and_says_what_to_change(capsys):
    cluster = ["--nodes", "16", "--gpus-per-node", "16", "--gpu", "v100"]
    with pytest.raises(SystemExit) as fits:
        main(["plan", TNLG, *cluster])
    out = capsys.readouterr().out
    assert fits.value.code == 0, out
    assert "17.18B parameters, 4.30B per GPU" in out and ": fits" in out and "MFU" in out
    with pytest.raises(SystemExit) as too_big:
        main(["plan", TNLG, "parallel.tp=1", "train.micro_batch_size=2", *cluster])
    out = capsys.readouterr().out
    assert too_big.value.code == 1 and "does NOT fit" in out and "parallel.tp=4 train.grad_accum=4" in out


@pytest.mark.parametrize("args,expected", [
    (["--gpu", "a200"], "--gpu a200 is not known; choose one of v100, a100-40gb, a100, h100, h200"),
    (["--gpu", "v100", "train.precision=bf16"], "train.precision=bf16 is not supported on V100-32GB; use fp16 or fp32"),
    (["--gpus-per-node", "6"], "world size 6 is not divisible by tp x ep x pp = 4x1x1"),
    (["--nodes", "0"], "--nodes=0 --gpus-per-node=8: both must be 1 or more"),
    (["--efficiency", "1.5"], "--efficiency=1.5 must be a fraction of peak in (0, 1]"),
])
def test_bad_input_is_one_line_naming_what_to_change(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", TNLG, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err
