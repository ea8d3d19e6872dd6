"""Issue 8: `parallax plan` counts the real model on the meta device, plans memory and step time, and
reproduces published facts (GPT-3, T-NLG, T5 and Llama sizes, T-NLG's V100 layout, a real engine's
memory). Issue 16: the same for the GPT's Llama-style options (GQA, SwiGLU, no biases, untied).
Issue 25 point 7: pipelines (what a stage holds and keeps in flight, the bubble, point-to-point
traffic, PP in the search) and the published 3D layouts of GPT-3 175B and MT-NLG 530B. Issue 26 point 6:
recurrent memory's FLOPs and activations, against the formula and a real model's. Issue 27 point 6: BERT,
RoBERTa and Megatron-BERT counted as transformers counts them, and their FLOPs and activations."""
import re
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import load_config
from launcher.plan.count import built_count, checked_count, closed_form_count
from launcher.plan.hardware import Cluster
from launcher.plan.cli import render
from launcher.plan.layout import advice, plan, search
from launcher.plan.memory import activation_bytes
from launcher.plan.throughput import (dp_bytes_per_step, ep_bytes_per_step, forward_flops_per_sequence,
                                      memory_token_overhead, tp_bytes_per_step)
from tests.distributed.scenarios_plan import MEMORY_CASES, MODEL, WORK_CASES, WORK_MODEL

PUBLISHED = sorted(p for p in Path("configs").glob("*.yaml") if not p.stem.endswith("-tiny"))  # -tiny: CPU-sized
TNLG = "configs/tnlg-17b.yaml"
DGX2_X16 = Cluster.of(16, 16, "v100")  # T-NLG's 256 V100-32GB
MOE = "configs/gpt-moe-52b.yaml"
A100_X128 = Cluster.of(16, 8, "a100")
SMALL_MOE = ("model.num_layers=4", "model.hidden_size=128", "model.num_heads=8", "model.ffn_hidden_size=320",
             "model.vocab_size=1000", "model.moe.num_experts=8")
# Every Llama-style option at once; 8 key/value heads for 16 query heads, so TP=8 holds whole ones.
LLAMA_STYLE = ("model.position_embedding=rotary", "model.norm=rmsnorm", "model.mlp=swiglu", "model.num_heads=16",
               "model.num_kv_heads=8", "model.linear_bias=false", "model.tie_embeddings=false")


def closed_form_plan(cfg, cluster, vocab_size=None):
    """Plan without the meta build (tested on its own below), to keep the suite fast."""
    vocab_size = vocab_size or cfg.model.vocab_size
    return plan(cfg, cluster, vocab_size=vocab_size,
                count=closed_form_count(cfg.model, vocab_size, cfg.parallel.tp, cfg.parallel.ep))


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("arch", [(), ("model.position_embedding=rotary", "model.norm=rmsnorm"), LLAMA_STYLE,
                                  ("model.memory.num_mem_tokens=4", "model.memory.segment_len=32")],
                         ids=["gpt2", "rotary-rmsnorm", "llama", "memory"])
def test_meta_build_matches_the_closed_form(tp, arch):
    m = load_config(None, ["model.num_layers=3", "model.hidden_size=128", "model.num_heads=8",
                           "model.ffn_hidden_size=320", "model.vocab_size=1000", *arch]).model
    built = built_count(m, 1000, tp)
    assert built == closed_form_count(m, 1000, tp)
    assert built.total == closed_form_count(m, 1000, 1).per_rank  # every shard counted once
    assert (built.per_rank < built.total) == (tp > 1)


T5_SMALL = ("model.arch=t5", "model.norm=rmsnorm", "model.num_layers=3", "model.num_decoder_layers=2",
            "model.hidden_size=128", "model.num_heads=8", "model.kv_channels=24", "model.ffn_hidden_size=320",
            "model.vocab_size=1000")


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("variant", [(), ("model.feed_forward=gated-gelu", "model.tie_embeddings=false"),
                                     ("model.moe.num_experts=4", "model.moe.top_k=1")])
def test_meta_t5_build_matches_the_closed_form(tp, variant):
    m = load_config(None, [*T5_SMALL, *variant]).model
    ep = 2 if m.moe and tp < 8 else 1
    built = built_count(m, 1000, tp, ep)
    assert built == closed_form_count(m, 1000, tp, ep)
    assert built.total == closed_form_count(m, 1000, 1, 1).per_rank


BERT_SMALL = ("model.arch=bert", "model.num_layers=3", "model.hidden_size=128", "model.num_heads=8",
              "model.ffn_hidden_size=320", "model.vocab_size=1000")


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("variant", [(), ("model.norm_placement=pre", "model.type_vocab_size=0"),
                                     ("model.position_offset=2", "model.type_vocab_size=1", "model.linear_bias=false")],
                         ids=["bert", "megatron-bert", "roberta-unbiased"])
def test_meta_bert_build_matches_the_closed_form(tp, variant):
    m = load_config(None, [*BERT_SMALL, *variant]).model
    built = built_count(m, 1000, tp)
    assert built == closed_form_count(m, 1000, tp)
    assert built.total == closed_form_count(m, 1000, 1).per_rank


def _transformers_masked_lm_parameters(name: str) -> int:
    """transformers' own count of the Hub model's masked-LM class, built on the meta device from the published
    config.json's shapes (bert-base-uncased, bert-large-uncased, roberta-base, roberta-large); the decoder is
    tied to the word embedding and its bias is the head's, each counted once."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    size = large if name.endswith("large") else {}
    with torch.device("meta"):
        if name.startswith("bert"):
            model = BertForMaskedLM(BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
                                               layer_norm_eps=1e-12, **size))
        else:
            model = RobertaForMaskedLM(RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                                     layer_norm_eps=1e-5, pad_token_id=1, **size))
    assert model.config.tie_word_embeddings
    return model.num_parameters()


@pytest.mark.parametrize("name", ["bert-base", "bert-large", "roberta-base", "roberta-large"])
def test_bert_and_roberta_plans_count_what_transformers_counts(name):
    """The count `parallax plan` prints (the meta build, checked against the closed form) is transformers'
    total exactly, once the vocabulary padding is taken off: model.vocab_multiple pads the word embedding and
    the head's output bias to 30592 (50304) rows, which the export trims back to model.vocab_size."""
    cfg = load_config(f"configs/{name}.yaml")
    m = cfg.model
    count = checked_count(m, m.vocab_size, cfg.parallel.tp)
    padding = (m.padded_vocab_size(m.vocab_size) - m.vocab_size) * (m.hidden_size + 1)  # embedding rows, bias
    assert count.total - padding == _transformers_masked_lm_parameters(name)
    unpadded = load_config(f"configs/{name}.yaml", ["model.vocab_multiple=1"]).model
    assert closed_form_count(unpadded, m.vocab_size, 1).total == _transformers_masked_lm_parameters(name)


@pytest.mark.parametrize("name", ["bert-large", "megatron-bert-3.9b"])
def test_bert_flops_are_six_per_parameter_per_token_plus_attention(name):
    """6N per token over the parameters that multiply (all but the position and token-type tables, whose
    lookups cost nothing; the tied word embedding is the output layer's matmul), plus the bidirectional
    scores, full s x s: the masked-LM head runs at every position, its transform included."""
    cfg = load_config(f"configs/{name}.yaml")
    p = closed_form_plan(cfg, Cluster.of(4, 8, "a100"))
    m, s = cfg.model, cfg.data.seq_len
    multiplied = p.count.total - (m.first_position + m.max_seq_len + m.token_types) * m.hidden_size
    attention = 12 * m.num_layers * s * m.hidden_size
    assert p.step.model_flops / p.step.tokens == pytest.approx(6 * multiplied + attention, rel=0.002)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_bert_activations_are_korthikantis_blocks_and_the_masked_lm_heads_tensors(placement):
    """Korthikanti's 34sbh + 5as^2b per block (the bidirectional scores are the same s x s), then the ends: the
    embedding's output, post-LN's embedding norm input (pre-LN's final norm input instead), the head
    transform's dense, GeLU and norm inputs, the output layer's input and fp32 logits (a GPT keeps 2 of these
    6 [s, b, h] tensors). 16-bit, so 2 bytes
    per unit of Korthikanti's count / 2."""
    cfg = load_config("configs/bert-base.yaml", ["parallel.tp=1", "train.micro_batch_size=2",
                                                 f"model.norm_placement={placement}"])
    s, b, h, a, L, v = 512, 2, 768, 12, 12, 30592
    blocks = L * (34 * s * b * h + 5 * a * s * s * b)
    ends = 2 * s * b * h * (1 + 1 + 3 + 1) + 4 * s * b * v
    assert activation_bytes(cfg, 30522) == blocks + ends


def test_t5_flops_are_six_per_parameter_per_token_plus_attention():
    """Per input token, 6N counted over the parameters each token meets: the encoder's at s_in
    tokens, the decoder's and the output layer's at s_out, plus the attention scores."""
    cfg = load_config("configs/t5-base.yaml")
    p = closed_form_plan(cfg, Cluster.of(1, 8, "h100"))
    m, (s_in, s_out) = cfg.model, cfg.t5_lengths()
    h, f, v = m.hidden_size, m.ffn_size, m.padded_vocab_size(m.vocab_size)
    encoder_layer, decoder_layer = 4 * h * h + 2 * h * f, 8 * h * h + 2 * h * f
    matmul_parameters_times_tokens = (12 * encoder_layer * s_in + 12 * decoder_layer * s_out + v * h * s_out
                                      - 12 * 2 * h * h * (s_out - s_in))  # cross-attention's k, v read s_in tokens
    scores = 12 * 4 * h * (s_in * s_in + s_out * s_out + s_out * s_in)
    per_sequence = 3 * (2 * matmul_parameters_times_tokens + scores)
    assert p.step.model_flops / (p.step.tokens / s_in) == pytest.approx(per_sequence, rel=1e-9)


# Published totals and how close the count must come. GPT-3, T-NLG and T5 are rounded in their papers
# (Hugging Face counts t5-base 222.9M, t5-large 737.7M, t5-11b 11.31B: T5 v1, ReLU, output layer tied
# to the 32128-row embedding). Llama's are exact, so they are matched exactly (a stray bias would be
# 0.02%, inside any tolerance): Meta's papers and model cards round them (7B, 13B, 70B; 8B, 70B), but
# the meta-llama checkpoints on Hugging Face hold exactly what the shapes in their config.json give,
# e.g. Llama 2 7B: 32 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
# = 6,738,415,616. The Hub's safetensors totals agree for Llama 3.1 8B and 70B (Llama 3's shapes) and
# read 64 more per layer for Llama-2-*-hf: a rotary inv_freq buffer those files saved, not a parameter.
PUBLISHED_SIZES = [
    ("gpt3-175b", 175e9, 0.01), ("tnlg-17b", 17e9, 0.02),
    ("t5-base", 223e6, 0.005), ("t5-large", 738e6, 0.005), ("t5-11b", 11.3e9, 0.005),
    ("llama2-7b", 6_738_415_616, 0), ("llama2-13b", 13_015_864_320, 0), ("llama2-70b", 68_976_648_192, 0),
    ("llama3-8b", 8_030_261_248, 0), ("llama3-70b", 70_553_706_496, 0),
    ("megatron-bert-3.9b", 3.9e9, 0.01),  # Shoeybi et al. 2019, table 4, rounded
]


@pytest.mark.parametrize("name,published,tolerance", PUBLISHED_SIZES, ids=[size[0] for size in PUBLISHED_SIZES])
def test_published_sizes_counted_as_parallax_plan_counts_them(name, published, tolerance):
    """The count `parallax plan` prints: rank 0 of the config's layout built on the meta device and
    checked against the closed form. TP splits nearly all of every published model."""
    cfg = load_config(f"configs/{name}.yaml")
    count = checked_count(cfg.model, cfg.model.vocab_size, cfg.parallel.tp)
    assert count.total == pytest.approx(published, rel=tolerance), count
    assert count.per_rank == pytest.approx(count.total / cfg.parallel.tp, rel=0.01)


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


def test_checkpoint_host_ram_is_what_a_real_save_copies(scenario_results):
    """A rank's saves keep host buffers of its fp32 masters and moments (DP=2, ZeRO-1: half of them), measured
    by copying a real engine's fragments; and T-NLG at tp=4 dp=2 on one node keeps its optimizer's share of
    GPU memory again in host RAM, 8 ranks' worth of it per node."""
    from tests.distributed.scenarios import tiny_config
    from tests.distributed.scenarios_checkpoint import layout

    copied = scenario_results("host_copies_of_two_saves")["bytes"]
    planned = closed_form_plan(tiny_config(*layout(tp=1, dp=2, zero=1)), Cluster.of(1, 2, "a100"))
    assert copied == pytest.approx(planned.checkpoint_host_bytes, rel=0.01)
    tnlg = closed_form_plan(load_config(TNLG, ["train.precision=bf16", "parallel.zero_stage=1"]),
                            Cluster.of(1, 8, "h100"), vocab_size=50257)
    assert tnlg.checkpoint_host_bytes == pytest.approx(tnlg.memory.optimizer) == 12 * tnlg.count.per_rank / tnlg.dp
    out = render(tnlg)
    assert f"{tnlg.checkpoint_host_bytes * 8 / 2**30:.2f} GiB per node" in out


@pytest.mark.parametrize("name,cluster", [("gpt3-175b", Cluster.of(192, 8, "a100")),  # its published cluster
                                          ("llama3-70b", Cluster.of(64, 8, "h100"))])
def test_flops_are_six_per_parameter_per_token_plus_attention(name, cluster):
    """Kaplan et al.'s 6N per token, from the parameter count, against Megatron's FLOP count: GPT-3's
    block, and Llama 3's (grouped-query attention, SwiGLU), whose untied embedding is a lookup, not
    a matmul."""
    cfg = load_config(f"configs/{name}.yaml")
    p = closed_form_plan(cfg, cluster)
    m, s = cfg.model, cfg.data.seq_len
    multiplied = p.count.total - (0 if m.tied else m.padded_vocab_size(m.vocab_size) * m.hidden_size)
    attention = 12 * m.num_layers * s * m.hidden_size  # QK^T and AV, forward and backward
    assert p.step.model_flops / p.step.tokens == pytest.approx(6 * multiplied + attention, rel=0.005)
    assert p.step.hardware_flops / p.step.model_flops == pytest.approx(4 / 3, rel=0.01)  # recomputed forward


def test_llama_activations_keep_narrower_keys_and_values_and_swiglus_gate():
    """Korthikanti's count, tensor by tensor: 8 key/value heads for 64 query heads keep K and V at
    1/8 of their multi-head width; SwiGLU keeps two [s, b, f] tensors more than GeLU at the same f
    (fc_gate's output and the product). In bf16, 2 bytes per element, per layer."""
    base = ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.activation_checkpointing=false",
            "train.micro_batch_size=1"]
    llama = activation_bytes(load_config("configs/llama2-70b.yaml", base), 32000)
    multi_head = activation_bytes(load_config("configs/llama2-70b.yaml", [*base, "model.num_kv_heads=64"]), 32000)
    gelu = activation_bytes(load_config("configs/llama2-70b.yaml", [*base, "model.mlp=gelu"]), 32000)
    layers, s, h, f = 80, 4096, 8192, 28672
    assert multi_head - llama == pytest.approx(layers * 2 * 2 * s * h * (1 - 8 / 64))
    assert llama - gelu == pytest.approx(layers * 2 * 2 * s * f)


def test_llama_tiny_costs_what_gpt_tiny_costs():
    """configs/llama-tiny.yaml's promise: its blocks are gpt-tiny's in FLOPs, so it trains in about
    the time of `make demo` (same batch); only the untied output layer adds parameters."""
    demo = ["train.micro_batch_size=8", "train.steps=400"]
    gpt, llama = (closed_form_plan(load_config(f"configs/{name}.yaml", demo), Cluster.of(1, 2, "a100"), 8192)
                  for name in ("gpt-tiny", "llama-tiny"))
    assert llama.step.model_flops == pytest.approx(gpt.step.model_flops, rel=0.01)
    output_layer = 8192 * 256
    assert llama.count.total - output_layer == pytest.approx(gpt.count.total, rel=0.01)


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
    (["--gpus-per-node", "6"], "world size 6 is not divisible by tp x pp = 4x1; use a multiple of 4 ranks"),
    (["--nodes", "0"], "--nodes=0 --gpus-per-node=8: both must be 1 or more"),
    (["--efficiency", "1.5"], "--efficiency=1.5 must be a fraction of peak in (0, 1]"),
])
def test_bad_input_is_one_line_naming_what_to_change(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", TNLG, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("tp,ep,moe", [
    (1, 1, ()), (2, 2, ()), (2, 4, ("model.moe.top_k=1",)), (1, 8, ("model.moe.every=1",)),
    (2, 2, LLAMA_STYLE),  # the experts stay GeLU MLPs with biases; the rest of each block goes Llama
])
def test_meta_moe_build_matches_the_closed_form(tp, ep, moe):
    m = load_config(None, [*SMALL_MOE, *moe]).model
    built = built_count(m, 1000, tp, ep)
    assert built == closed_form_count(m, 1000, tp, ep)
    # Each rank holds num_experts / ep experts per MoE layer, whole: replicated over TP, not split.
    h, f, moe_layers = 128, 320, m.num_layers // m.moe.every
    assert built.experts_per_rank == moe_layers * 8 // ep * (2 * h * f + f + h)
    assert built.total == closed_form_count(m, 1000, 1, 1).per_rank  # every shard and every expert once


@pytest.mark.parametrize("top_k", [1, 2])
def test_active_parameters_are_the_dense_model_plus_routers_and_top_k_experts(top_k):
    """GPT.parameter_counts() semantics: a token meets every dense parameter, every router, and top_k
    experts of each MoE layer; one expert is one dense MLP, so Switch top-1 is the dense model plus
    its routers."""
    m = load_config(None, [*SMALL_MOE, f"model.moe.top_k={top_k}"]).model
    moe = closed_form_count(m, 1000, 2, 4)
    dense = closed_form_count(m.model_copy(update={"moe": None}), 1000, 1)
    h, f, moe_layers = 128, 320, 2
    routers, mlp = moe_layers * h * 8, moe_layers * (2 * h * f + f + h)
    assert moe.active_per_token == dense.total + routers + (top_k - 1) * mlp
    assert moe.total == dense.total + routers + (8 - 1) * mlp
    assert dense.active_per_token == dense.total


def test_moe_config_is_deepspeed_moes_52b_and_fits_its_cluster():
    cfg = load_config(MOE)
    count = built_count(cfg.model, 50257, cfg.parallel.tp, cfg.parallel.ep)
    assert abs(count.total / 52e9 - 1) < 0.01, count
    gpt3_xl = closed_form_count(load_config("configs/gpt3-1.3b.yaml").model, 50257, 1)
    assert count.active_per_token == gpt3_xl.total + 12 * 2048 * 128  # top-1: the dense model + 12 routers
    p = closed_form_plan(cfg, A100_X128)
    assert p.fits and p.dp == 128 and p.global_batch == 512
    assert p.step.model_flops / p.step.tokens == pytest.approx(  # 6N per token with N the active parameters
        6 * count.active_per_token + 12 * 24 * 2048 * 2048, rel=0.005)


def test_expert_states_are_partitioned_over_the_expert_data_parallel_ranks():
    """DeepSpeed's ZeRO 1/2 partition expert optimizer states (and from stage 2 gradients) over the
    dp / ep ranks holding the same experts, not over all of DP."""
    def experts(ep, stage):
        return closed_form_plan(load_config(MOE, [f"parallel.ep={ep}", f"parallel.zero_stage={stage}"]),
                                A100_X128).memory.experts

    n = closed_form_count(load_config(MOE).model, 50257, 1, 32).experts_per_rank
    assert experts(32, 0) == pytest.approx(n * (2 + 2 + 12))  # bf16 weights and gradients; fp32 master, m, v
    assert experts(32, 1) == pytest.approx(n * (2 + 2 + 12 / 4))  # optimizer over the 128 / 32 expert-DP ranks
    assert experts(32, 2) == pytest.approx(n * (2 + (2 + 12) / 4))
    assert experts(128, 2) == pytest.approx(n / 4 * 16)  # a single rank per expert: nothing to partition


def test_all_to_all_volume_is_the_capacity_buffer_four_times_per_moe_layer():
    base = ["parallel.tp=2", "parallel.ep=8", "parallel.activation_checkpointing=false", "train.grad_accum=2"]
    cfg = load_config(MOE, base)
    tokens_hidden = 2048 * 4 * 2048 * 2 / 2  # one micro-batch's [s, b, h] in bf16, this TP rank's half
    assert ep_bytes_per_step(cfg) == pytest.approx(2 * 12 * 4 * 7 / 8 * tokens_hidden * 1 * 1.25)
    assert ep_bytes_per_step(load_config(MOE, [*base, "model.moe.top_k=2"])) == pytest.approx(2 * ep_bytes_per_step(cfg))
    recomputed = load_config(MOE, [*base, "parallel.activation_checkpointing=true"])
    assert ep_bytes_per_step(recomputed) == pytest.approx(1.5 * ep_bytes_per_step(cfg))
    assert ep_bytes_per_step(load_config(MOE, ["parallel.ep=1"])) == 0


def test_moe_layout_that_does_not_fit_is_told_to_raise_ep():
    """All 128 experts on every GPU (EP=1) is 52B parameters per GPU; no ZeRO stage MoE allows can
    hold that, and sharding the experts can."""
    too_big = closed_form_plan(load_config(MOE, ["parallel.ep=1"]), A100_X128)
    assert not too_big.fits
    fixes = dict(advice(too_big))
    assert "parallel.ep=4" in fixes and fixes["parallel.ep=4"].fits
    assert not closed_form_plan(load_config(MOE, ["parallel.ep=2"]), A100_X128).fits  # 4 is the smallest
    assert not [fix for fix in fixes if "zero_stage" in fix]


def test_search_shards_experts_only_over_ep_dividing_dp_and_the_experts():
    cluster = Cluster.of(2, 8, "a100")
    current = closed_form_plan(load_config(MOE, ["model.moe.num_experts=24", "parallel.ep=8",
                                                 "train.micro_batch_size=4", "train.grad_accum=8"]), cluster)
    ranked = search(current)
    assert ranked and all(p.fits and p.global_batch == 512 for p in ranked)
    assert all(p.dp % p.cfg.parallel.ep == 0 and 24 % p.cfg.parallel.ep == 0 for p in ranked)
    assert {p.cfg.parallel.ep for p in ranked} == {1, 2, 4, 8}  # 3, 6, 12, 24 divide no DP size of 16 GPUs
    assert {p.cfg.parallel.zero_stage for p in ranked} <= {0, 1, 2}
    assert ranked[0].layout().startswith("tp=") and " ep=" in ranked[0].layout()


def test_startup_is_each_ranks_own_weights_as_built_and_their_draw_time():
    """A TP=4 rank of T-NLG builds and draws a quarter of the split weights, not the whole model, on
    its GPU in bf16; the host holds only a tile of slices being drawn. At ZeRO-3 it holds only its
    partition and one layer."""
    from launcher.plan.startup import CPU_NS_PER_ELEMENT, startup_per_rank
    from models.init import DRAW_TILE_ELEMENTS

    cfg = load_config(TNLG, ["train.precision=bf16", "parallel.zero_stage=1"])
    whole, rank = (closed_form_count(cfg.model, 50257, tp) for tp in (1, 4))
    startup = startup_per_rank(cfg, rank, dp=8)
    assert startup.built_bytes == 2 * rank.per_rank < 2 * whole.per_rank / 3.9
    assert startup.host_bytes == (4 + 2) * DRAW_TILE_ELEMENTS  # fp32, and bf16 on its way to the GPU
    assert startup.init_seconds == pytest.approx(rank.per_rank * CPU_NS_PER_ELEMENT * 1e-9)
    zero3 = startup_per_rank(load_config(TNLG, ["train.precision=bf16", "parallel.zero_stage=3"]), rank, dp=8)
    assert zero3.built_bytes == 2 * (rank.per_rank / 8 + rank.per_layer_per_rank) < startup.built_bytes / 4

# Issue 25 point 7: pipeline parallelism. Megatron's rank order, PP slowest; the first stage holds the
# embedding, the last the final norm, output layer and loss, a tied embedding both.
MTNLG, GPT3 = "configs/mtnlg-530b.yaml", "configs/gpt3-175b.yaml"
MTNLG_CLUSTER, GPT3_CLUSTER = Cluster.of(280, 8, "a100"), Cluster.of(192, 8, "a100")  # their published clusters
# The tests of the pipeline's arithmetic below take GPT-3 175B at 12 stages of 8 layers and 192 micro-batches on
# 96 nodes (768 GPUs, DP=8), figures they were worked out for by hand.
PP12, CLUSTER_768 = ["parallel.pp=12", "train.grad_accum=192"], Cluster.of(96, 8, "a100")


def test_the_published_3d_layouts_are_the_defaults_and_fit_their_clusters():
    """MT-NLG (Smith et al. 2022): TP=8 x PP=35 x DP=8 on 280 DGX A100s, ZeRO-1, batch 1920, 3 layers per
    stage. GPT-3 175B as Megatron-LM trained it (Narayanan et al. 2021, table 1): TP=8 x PP=16 x DP=12 on
    1536 GPUs, batch 1536, 6 layers per stage."""
    for path, cluster, (tp, pp, dp, batch, layers) in ((MTNLG, MTNLG_CLUSTER, (8, 35, 8, 1920, 3)),
                                                      (GPT3, GPT3_CLUSTER, (8, 16, 12, 1536, 6))):
        cfg = load_config(path)
        planned = closed_form_plan(cfg, cluster)
        assert (cfg.parallel.tp, cfg.parallel.pp, planned.dp, cfg.parallel.zero_stage) == (tp, pp, dp, 1), path
        assert planned.global_batch == batch and {len(stage) for stage in cfg.stage_layers()} == {layers}, path
        assert planned.fits, path
        # ZeRO-1's optimizer share over DP; the weights and gradients of one stage's layers only
        assert planned.memory.parameters < 2 * planned.count.total / (tp * pp) * 1.1


def test_cli_says_mtnlg_fits_its_published_cluster_with_its_bubble(capsys):
    with pytest.raises(SystemExit) as fits:
        main(["plan", MTNLG, "--nodes", "280", "--gpus-per-node", "8", "--gpu", "a100"])
    out = capsys.readouterr().out
    assert fits.value.code == 0, out
    assert "tp=8 pp=35 dp=8 zero=1" in out and ": fits" in out
    assert "35 stages of 3 layers; 1F1B, 240 micro-batches per step; bubble (p-1)/(v m+p-1) = 34/274 = 12.4%" in out
    assert "pipeline rank 0 of 35: layers 0-2, the embedding; 35 micro-batches in flight" in out
    assert re.search(r"PP sends +\d+\.\d+ GB per GPU over network", out) and "pipeline bubble 12.4%" in out


def test_a_pipeline_rank_holds_its_stages_layers_over_tp_and_its_end_of_the_model():
    """What a GPU holds: its stage's blocks / TP (replicated norms and biases whole), the first stage the
    vocabulary-parallel word embedding and the learned positions, the last the final norm and, tied, a
    copy of the word embedding; untied, the output layer instead."""
    from launcher.plan.pipeline import pipeline_ranks

    cfg = load_config(GPT3, [*PP12, "parallel.pp=2"])
    m, tp = cfg.model, 8
    whole = closed_form_count(m, 50257, tp)
    layer, word, positions, norm = whole.per_layer_per_rank, 50304 * 12288 // tp, 2048 * 12288, 2 * 12288
    assert whole.per_rank == 96 * layer + word + positions + norm  # one rank, one tied matrix
    first, last = (closed_form_count(m, 50257, tp, rank=rank) for rank in pipeline_ranks(cfg))
    assert first.per_rank == 48 * layer + word + positions
    assert last.per_rank == 48 * layer + norm + word
    assert first.total == last.total == whole.total  # the model's size, the tied copy counted once
    assert first.per_rank + last.per_rank - word == whole.per_rank  # the second copy is all PP adds
    planned = closed_form_plan(cfg, CLUSTER_768)
    assert planned.count == first and planned.rank.index == 0  # the largest stage is the one planned
    assert planned.memory.parameters == 2 * first.per_rank < 0.51 * 2 * whole.per_rank
    untied = load_config(GPT3, [*PP12, "parallel.pp=2", "model.tie_embeddings=false"])
    first, last = (closed_form_count(untied.model, 50257, tp, rank=rank) for rank in pipeline_ranks(untied))
    assert (first.per_rank, last.per_rank) == (48 * layer + word + positions, 48 * layer + norm + word)
    assert first.total == whole.total + 50304 * 12288


def test_the_first_stage_of_1f1b_keeps_p_micro_batches_and_interleaving_more():
    """1F1B: rank r keeps p - r micro-batches (at most m); the first stage's p micro-batches of L/p layers
    are L layers' worth, what one micro-batch keeps without a pipeline (Korthikanti et al. 2022, 4.2.3).
    Interleaved: p (1 + (p - 1) / (p v)) on the first rank."""
    from launcher.plan.pipeline import pipeline_ranks

    def in_flight(*overrides):
        return [rank.in_flight for rank in pipeline_ranks(load_config(GPT3, [*PP12, *overrides]))]

    assert in_flight("parallel.pp=4", "train.grad_accum=8") == [4, 3, 2, 1]
    assert in_flight("parallel.pp=4", "train.grad_accum=2") == [2, 2, 2, 1]
    assert in_flight("parallel.pp=4", "parallel.virtual_stages=2", "train.grad_accum=8")[0] == 4 * (1 + 3 / 8)
    assert in_flight("parallel.pp=12", "parallel.virtual_stages=2")[0] == 12 * (1 + 11 / 24)
    assert in_flight("parallel.pp=1") == [1]

    base = ["parallel.activation_checkpointing=false", "parallel.sequence_parallel=false", "train.grad_accum=8"]
    unpipelined = load_config(GPT3, [*PP12, *base, "parallel.pp=1"])
    piped = load_config(GPT3, [*PP12, *base, "parallel.pp=4"])
    first, *_, last = pipeline_ranks(piped)
    s, b, h, v, t = 2048, 1, 12288, 50304, 8
    embedding, output = 2 * s * b * h / t, 2 * s * b * h / t + 4 * s * b * v / t  # bf16: 2 bytes per 16-bit unit / 2
    blocks = activation_bytes(unpipelined, 50257) - embedding - output
    assert activation_bytes(piped, 50257, first) == pytest.approx(blocks + 4 * embedding)
    assert activation_bytes(piped, 50257, last) == pytest.approx(blocks / 4 + output)
    # Checkpointed, the in-flight micro-batches keep each block's input; one block is rebuilt at a time.
    ckpt = load_config(GPT3, [*PP12, "parallel.pp=4", "train.grad_accum=8"])
    rebuilt_and_ends = activation_bytes(ckpt, 50257, first) - 4 * 24 * 2 * s * b * h / t
    assert rebuilt_and_ends == pytest.approx(activation_bytes(ckpt, 50257) - 96 * 2 * s * b * h / t - output
                                             + 3 * embedding)


def test_the_plan_shows_the_pipeline_rank_that_needs_the_most_memory():
    """With one micro-batch per step nothing waits in flight, and the last stage's fp32 logits of 192
    sequences outweigh the first stage's positions: the last rank decides whether it fits."""
    planned = closed_form_plan(load_config(GPT3, [*PP12, "train.micro_batch_size=192", "train.grad_accum=1"]),
                               CLUSTER_768)
    assert planned.rank.index == 11 and planned.rank.last and planned.rank.in_flight == 1
    default = closed_form_plan(load_config(GPT3, PP12), CLUSTER_768)
    assert default.rank.index == 0 and default.rank.in_flight == 12


@pytest.mark.parametrize("virtual_stages,bubble", [(1, 11 / 203), (2, 11 / 395), (4, 11 / 779)])
def test_step_time_includes_the_bubble_and_interleaving_shrinks_it(virtual_stages, bubble):
    """GPT-3 175B at p=12, m=192: bubble (p-1)/(v m+p-1). The micro-batch work of the slowest stage (the
    last: its 8 blocks and the output layer) stretched to busy / (1 - bubble); MFU pays for the idle."""
    cfg = load_config(GPT3, [*PP12, f"parallel.virtual_stages={virtual_stages}"])
    s = closed_form_plan(cfg, CLUSTER_768).step
    assert s.bubble == pytest.approx(bubble) == cfg.pipeline_bubble()
    busy = s.compute_seconds + s.tp_seconds + s.ep_seconds
    assert s.bubble_seconds == pytest.approx(busy * bubble / (1 - bubble))
    assert s.seconds == pytest.approx(busy / (1 - bubble) + s.dp_seconds + s.p2p_seconds)
    assert s.mfu == pytest.approx(s.model_flops / (s.seconds * s.peak_flops))
    h, seq, v = 12288, 2048, 50304
    last_stage = 8 * (24 * seq * h * h + 4 * seq * seq * h) * 4 + 2 * seq * h * v * 3  # recomputed blocks; output
    assert s.compute_seconds == pytest.approx(192 * last_stage / 8 / (312e12 * 0.5), rel=1e-6)
    unpiped = closed_form_plan(load_config(GPT3, [*PP12, "parallel.pp=1", "parallel.zero_stage=3", "train.grad_accum=16"]),
                               CLUSTER_768).step
    assert s.bubble_seconds > 0 and unpiped.bubble_seconds == 0 and unpiped.bubble == 0
    assert s.compute_seconds > unpiped.compute_seconds  # the last stage's output layer paces the pipeline


def test_point_to_point_volume_is_each_micro_batches_activations_and_gradients_per_chunk():
    """2 v m messages of [s, b, h] per GPU, 1/t of it each under sequence parallelism, over the network
    when the stages are on different nodes: GPT-3 at p=12, m=192, micro-batch 1, bf16, TP=8."""
    message = 2048 * 1 * 12288 * 2
    sp = closed_form_plan(load_config(GPT3, PP12), CLUSTER_768).step
    assert sp.p2p_bytes == pytest.approx(2 * 192 * message / 8)
    assert sp.p2p_seconds == pytest.approx(sp.p2p_bytes / 25e9)  # HDR InfiniBand per A100
    interleaved = closed_form_plan(load_config(GPT3, [*PP12, "parallel.virtual_stages=2"]), CLUSTER_768).step
    assert interleaved.p2p_bytes == pytest.approx(2 * sp.p2p_bytes)
    whole = closed_form_plan(load_config(GPT3, [*PP12, "parallel.sequence_parallel=false"]), CLUSTER_768).step
    assert whole.p2p_bytes == pytest.approx(2 * 192 * message)
    one_node = closed_form_plan(load_config(GPT3, [*PP12, "model.num_layers=8", "parallel.pp=4", "parallel.tp=2",
                                                   "train.grad_accum=4"]), Cluster.of(1, 8, "a100")).step
    assert one_node.p2p_seconds == pytest.approx(one_node.p2p_bytes / 300e9)  # NVLink
    assert closed_form_plan(load_config(GPT3, [*PP12, "parallel.pp=1", "parallel.zero_stage=3", "train.grad_accum=16"]),
                            CLUSTER_768).step.p2p_bytes == 0


def test_search_finds_pipelined_layouts_for_530b_with_tp_inside_a_node():
    ranked = search(closed_form_plan(load_config(MTNLG), MTNLG_CLUSTER))
    assert ranked and all(p.fits and p.global_batch == 1920 for p in ranked)
    assert all(p.cfg.parallel.tp <= 8 for p in ranked)
    assert ranked[0].cfg.parallel.pp > 1
    # dp must divide the batch of 1920 = 2^7 x 15, so every pipeline takes the 7 of 2240 = 2^6 x 5 x 7
    assert {7, 14, 28, 35} <= {p.cfg.parallel.pp for p in ranked} <= {7, 14, 28, 35, 56, 70}
    assert all(p.cfg.parallel.zero_stage <= 1 for p in ranked if p.cfg.parallel.pp > 1)
    assert any(p.layout() == "tp=8 pp=35 dp=8 zero=1 sp=on checkpointing=on micro-batch=1 grad-accum=240"
               for p in ranked)


def test_search_interleaves_where_the_layers_split_evenly():
    """From an unpipelined layout, the search tries pipelines and, for 24 layers over p stages, the
    virtual stages whose chunks are whole layers; an interleaved layout runs faster than plain 1F1B at
    the same layout, its bubble being smaller."""
    cfg = load_config(GPT3, [*PP12, "model.num_layers=24", "train.micro_batch_size=1", "train.grad_accum=32",
                             "parallel.pp=1"])
    ranked = search(closed_form_plan(cfg, Cluster.of(4, 8, "a100")))
    assert {p.cfg.parallel.pp for p in ranked} >= {1, 2, 4, 8}
    interleaved = [p for p in ranked if p.cfg.parallel.virtual_stages > 1]
    assert interleaved and all(24 % (p.cfg.parallel.pp * p.cfg.parallel.virtual_stages) == 0 for p in interleaved)
    assert all(p.cfg.train.grad_accum % p.cfg.parallel.pp == 0 for p in interleaved)
    one = next(p for p in interleaved if "vstages=2" in p.layout())
    plain = next(p for p in ranked if p.layout() == one.layout().replace("vstages=2 ", ""))
    assert one.step.bubble < plain.step.bubble and one.step.seconds < plain.step.seconds


def test_advice_offers_a_pipeline_when_a_stage_must_hold_less():
    """GPT-3 unpipelined at TP=8, ZeRO-1 holds 22B parameters per GPU in bf16 with their gradients: too
    much for 80 GB. Two stages halve it; the gradient accumulation keeps the global batch."""
    too_big = closed_form_plan(load_config(GPT3, [*PP12, "parallel.pp=1", "train.grad_accum=16"]), CLUSTER_768)
    assert not too_big.fits
    fixes = dict(advice(too_big))
    assert "parallel.pp=2 train.grad_accum=32" in fixes and fixes["parallel.pp=2 train.grad_accum=32"].fits
    assert fixes["parallel.pp=2 train.grad_accum=32"].global_batch == too_big.global_batch == 1536


def test_a_pipeline_the_world_cannot_hold_is_one_line_naming_tp_and_pp(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", GPT3, *PP12, "--nodes", "128", "--gpus-per-node", "8", "--gpu", "a100"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "world size 1024 is not divisible by tp x pp = 8x12; use a multiple of 96 ranks" in err


@pytest.mark.parametrize("tp,pp,virtual_stages", [(1, 2, 1), (2, 3, 1), (2, 2, 2)])
@pytest.mark.parametrize("arch", [(), LLAMA_STYLE, ("model.moe.num_experts=4",)], ids=["gpt2", "llama", "moe"])
def test_meta_stage_build_matches_the_closed_form(tp, pp, virtual_stages, arch):
    """Each pipeline rank's stage, as training builds it (its blocks; the embedding on the first; the
    final norm and output layer, tied or not, on the last), holds what the closed form says."""
    from launcher.plan.count import held
    from launcher.plan.pipeline import pipeline_ranks

    cfg = load_config(None, ["model.num_layers=6", "model.hidden_size=128", "model.num_heads=16",
                             "model.ffn_hidden_size=320", "model.vocab_size=1000", *arch, "train.precision=bf16",
                             f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.virtual_stages={virtual_stages}",
                             "train.grad_accum=6"])
    ep = 2 if cfg.model.moe else 1
    ranks = pipeline_ranks(cfg)
    built = [built_count(cfg.model, 1000, tp, ep, rank) for rank in ranks]
    assert [held(b) for b in built] == [held(closed_form_count(cfg.model, 1000, tp, ep, rank)) for rank in ranks]
    whole = closed_form_count(cfg.model, 1000, tp, ep)
    copy = 0 if not cfg.model.tied else 1024 * 128 // tp  # the last stage's copy of a tied embedding
    assert sum(b.per_rank for b in built) == whole.per_rank + copy


@pytest.mark.parametrize("pp,virtual_stages,micro_batches", [(4, 1, 8), (4, 1, 2), (4, 2, 8), (3, 3, 6), (5, 2, 5)])
def test_micro_batches_in_flight_are_the_real_schedules(pp, virtual_stages, micro_batches):
    """The plan's count is the most forwards parallel/pipeline/schedule.py has run and not yet run back,
    on every rank, in chunks of 1/v of the rank's layers."""
    from launcher.plan.pipeline import micro_batches_in_flight
    from parallel.pipeline.schedule import one_f_one_b

    cfg = load_config(GPT3, [*PP12, f"parallel.pp={pp}", f"parallel.virtual_stages={virtual_stages}",
                             f"train.grad_accum={micro_batches}"])
    for rank in range(pp):
        outstanding = peak = 0
        for action in one_f_one_b(pp, virtual_stages, micro_batches, rank):
            outstanding += 1 if action.kind == "forward" else -1
            peak = max(peak, outstanding)
        assert micro_batches_in_flight(cfg, rank) == peak / virtual_stages, rank


# configs/gpt-tiny.yaml as docs/memory.md trains it: 4 segments of 64 tokens, 8 memory tokens.
TINY_MEMORY = ["model.vocab_size=8192", "model.memory.num_mem_tokens=8", "model.memory.segment_len=64",
               "data.seq_len=256"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_tokens_cost_what_l_plus_2m_positions_per_segment_cost(capsys, checkpointing):
    """Each of the n segments runs L + 2M positions through every block, attending over its own L + 2M keys;
    the output layer runs the n L tokens. Megatron's count per pass of s' = L + 2M positions and block is
    24 s' h^2 (QKV, projection, 4h MLP) + 4 s'^2 h (scores and their product with V), the output layer's
    2 n L h V. Korthikanti's activations per pass and block: 34 s' b h + 5 a s'^2 b, every segment's kept
    (or with checkpointing every segment's block inputs, 2 s' b h, and one pass rebuilt); beside the blocks
    the embedding's 2 n s' b h, the output's 2 n L b h + 4 n L b V. So the blocks' linear terms grow by
    (L + 2M) / L, the scores are n s'^2 where a plain window's are (n L)^2, the output side is unchanged."""
    cfg = load_config("configs/gpt-tiny.yaml", [*TINY_MEMORY, f"parallel.activation_checkpointing={checkpointing}"])
    n, length, m, layers, h, a, b = 4, 64, 8, 4, 256, 4, 4
    span, v = length + 2 * m, cfg.model.padded_vocab_size(8192)

    def blocks(s):
        return n * layers * (24 * s * h * h + 4 * s * s * h)

    output = 2 * n * length * h * v
    overhead = (blocks(span) - blocks(length)) / (blocks(length) + output)
    p = closed_form_plan(cfg, Cluster.of(1, 1, "h100"))
    assert p.step.model_flops == pytest.approx(3 * b * (blocks(span) + output))
    assert memory_token_overhead(cfg, 8192) == pytest.approx(overhead) and 0.15 < overhead < 0.17
    one_pass = 34 * span * b * h + 5 * a * span * span * b
    kept = layers * (2 * n * span * b * h) + one_pass if checkpointing else n * layers * one_pass
    head = 2 * n * span * b * h + 2 * n * length * b * h + 4 * n * length * b * v + 2 * n * m * b * h
    fp32 = 2  # Korthikanti's units are 16-bit bytes
    assert p.memory.activations == pytest.approx((kept + head) * fp32)
    for bptt in (1, 0):  # truncated BPTT cuts gradients, not what the window's one backward keeps
        truncated = load_config("configs/gpt-tiny.yaml", [*TINY_MEMORY, f"model.memory.bptt_segments={bptt}",
                                                         f"parallel.activation_checkpointing={checkpointing}"])
        assert closed_form_plan(truncated, Cluster.of(1, 1, "h100")).memory.activations == p.memory.activations
    with pytest.raises(SystemExit) as fits:
        main(["plan", "configs/gpt-tiny.yaml", *TINY_MEMORY, f"parallel.activation_checkpointing={checkpointing}",
              "--gpus-per-node", "1"])
    out = capsys.readouterr().out
    assert fits.value.code == 0, out
    assert "segments  4 x (64 tokens + 2 x 8 memory) = 320 positions per sequence through every block, " \
           "each over 80 keys" in out
    assert f"memory tokens: +{overhead:.1%} FLOPs ({3 * (blocks(span) + output) / (n * length):.3g} per token)" in out
    assert re.search(rf"activations  micro-batch 4 x 4 segments x 80 positions, "
                     rf"{'checkpointed' if checkpointing else 'all kept'} +{(kept + head) * fp32 / 2**30:.2f}\n", out)


def test_an_answer_only_task_is_planned_at_its_curriculums_longest_input():
    """configs/rmt-fact-tiny.yaml, its curriculum reaching 4 of the 8 segments data.seq_len holds: a sample is
    4 segments of 32 tokens, and the output layer runs on its one answer token (2 h V FLOPs, 2 b h + 4 b V
    activations), not on 128."""
    cfg = load_config("configs/rmt-fact-tiny.yaml", ["model.vocab_size=8192", "data.seq_len=256"])
    n, length, span, layers, h, a, b = 4, 32, 48, 2, 128, 4, 32
    v = cfg.model.padded_vocab_size(8192)
    blocks, output = n * layers * (24 * span * h * h + 4 * span * span * h), 2 * h * v
    p = closed_form_plan(cfg, Cluster.of(1, 1, "h100"))
    assert p.step.model_flops == pytest.approx(3 * b * (blocks + output)) and p.step.tokens == b * n * length
    kept = n * layers * (34 * span * b * h + 5 * a * span * span * b)
    head = 2 * n * span * b * h + 2 * b * h + 4 * b * v + 2 * n * 8 * b * h  # + each segment's normed memory
    assert p.memory.activations == pytest.approx((kept + head) * 2)  # fp32
    out = render(p)
    assert "global batch 32 x 128 tokens" in out and "train.memory_curriculum: planned at its longest input" in out


def test_memory_tp_traffic_is_every_segments_positions_through_the_blocks():
    """Each block all-reduces its output twice forward and twice backward over n (L + 2M) positions; the
    embedding and the logits' input once each over the n L tokens."""
    cfg = load_config("configs/gpt-tiny.yaml", [*TINY_MEMORY, "parallel.tp=2"])
    sbh_bytes = 4 * 256 * 4  # micro-batch 4, hidden 256, fp32
    blocks, ends = 4 * 2 * 2 * 2 * (4 * 80) * sbh_bytes, 2 * 2 * 256 * sbh_bytes
    assert tp_bytes_per_step(cfg) == pytest.approx((blocks + ends) / 2)


def test_memory_plan_is_what_a_real_model_computes_and_keeps(scenario_results):
    """A real GPT's matrix multiplies (torch's FlopCounterMode) are the plan's FLOPs exactly, plain, with
    memory, Llama-style, answer-only: backward twice the forward, whatever bptt_segments. What autograd keeps
    for backward is the plan's activations within 20% (dropout on, fp32; answer-only is the farthest, as the
    plan's 8 bytes per fp32 logit, twice what the model keeps, no longer offsets what it misses in the
    blocks); with memory against without, within 3% of the planned ratio; the same at any bptt_segments, and
    n segments keep n times one segment's."""
    measured = scenario_results("plan_measured_work")
    planned = {}
    for name, overrides in WORK_CASES.items():
        cfg = load_config(None, [*WORK_MODEL, *overrides])
        forward = cfg.train.micro_batch_size * sum(forward_flops_per_sequence(cfg, 512))
        assert (measured[name]["forward_flops"], measured[name]["backward_flops"]) == (forward, 2 * forward), name
        planned[name] = activation_bytes(cfg, 512)
        assert measured[name]["kept_bytes"] == pytest.approx(planned[name], rel=0.2), name
    kept = {name: result["kept_bytes"] for name, result in measured.items()}
    assert kept["memory"] / kept["plain"] == pytest.approx(planned["memory"] / planned["plain"], rel=0.03)
    assert kept["memory"] / kept["plain"] > 1.1, "the memory tokens' activations must show"
    assert kept["memory_bptt1"] == kept["memory_bptt0"] == kept["memory"]
    assert kept["memory"] == pytest.approx(4 * kept["memory_one_segment"], rel=0.01)
