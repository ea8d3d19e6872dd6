"""Issue 26, its core: the recurrent memory transformer (model.memory) for the GPT family.

The scenarios are in tests/distributed/scenarios_memory.py: a model without memory is the decoder it was,
truncated BPTT really cuts the gradient, every layout (DP at ZeRO-0 to 3, TP=2 with and without sequence
parallelism, TP=2 x DP=2, MoE at EP=2) trains as one process does over 3 steps of 3-segment windows, the
MoE objective holds every segment's router loss, and a checkpoint holds and resumes the memory parameter.
Config errors are one line.
"""
import pytest
import torch

from launcher.cli import main
from launcher.config import load_config
from tests.distributed.scenarios_memory import MEM_TOKENS, SEGMENT_LEN, SEGMENTS
from tests.test_moe import MOE_TOL
from tests.test_parity import assert_model_matches, assert_training_matches

TINY = "configs/gpt-tiny.yaml"
MEMORY = ["model.memory.num_mem_tokens=8", "model.memory.segment_len=64"]


@pytest.mark.parametrize("style", ["gpt2", "llama_style"])
def test_a_model_without_memory_takes_the_plain_causal_path(scenario_results, style):
    result = scenario_results("memory_off_forward")[style]
    assert not result["memory_path_ran"]
    assert result["calls"] and all(c["is_causal"] is True and c["attn_mask"] is None for c in result["calls"]), \
        "the plain model must keep the causal attention call, with no mask"
    assert not any("memory" in name for name in result["names"])


@pytest.mark.parametrize("run", [-1, 1, 0, "llama_style_bptt1"])
def test_truncated_bptt_cuts_the_gradient_where_it_says(scenario_results, run):
    """Only the last of 3 segments is scored. Its loss reaches the tokens of the segments the memory carries
    gradient through (bptt_segments back, all for -1) and not one before: exactly zero there."""
    result = scenario_results("memory_bptt_gradients")[run]
    bptt = 1 if run == "llama_style_bptt1" else run
    grads = result["segment_grads"]
    assert len(grads) == 3 and grads[2] > 0
    reached = [i >= 2 - bptt for i in range(3)] if bptt >= 0 else [True] * 3
    for segment, (grad, should_reach) in enumerate(zip(grads, reached)):
        if should_reach:
            assert grad is not None and grad > 0, f"segment {segment} gets no gradient at bptt_segments={bptt}"
        else:
            assert grad is None or grad == 0.0, f"segment {segment} gets gradient {grad} at bptt_segments={bptt}"
    # The initial memory is read by the first segment only: it learns from the last segment's loss at full BPTT.
    assert (result["memory_grad"] or 0.0) > 0 if bptt == -1 else (result["memory_grad"] or 0.0) == 0.0


def test_memory_logits_are_causal_over_the_whole_window(scenario_results):
    for result in scenario_results("memory_bptt_gradients").values():
        assert result["logits_shape"] == (24, 8, 512), "a logit per token of every segment, none for memory"
        assert result["earlier_logits_unchanged"] and result["last_logits_changed"]


@pytest.mark.parametrize("layout,run", [
    ("memory_tp2_training", None),
    ("memory_tp2_sequence_parallel_training", None),
    ("memory_tp2_dp2_training", None),
    ("memory_dp2_training", 0),
    ("memory_dp2_training", 1),
    ("memory_dp2_training", 2),
    ("memory_dp2_zero3_training", "straight"),
])
def test_memory_trains_at_every_layout_as_one_process(scenario_results, layout, run):
    reference = scenario_results("memory_reference_training")
    assert len(reference) == 3 and reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    records = scenario_results(layout)
    assert_training_matches(reference, records if run is None else records[run])


@pytest.mark.parametrize("style", ["gpt2", "llama_style"])
def test_sequence_parallel_memory_gradients_match_one_process(scenario_results, style):
    """Logits, loss and every parameter's gradient (the initial memory's and the position embedding's among
    them) at TP=2 with sequence parallelism, as one process computes them."""
    reference = scenario_results("memory_reference_model")[style]
    assert "memory.weight" in reference["grads"]
    assert ("position_embedding.weight" in reference["grads"]) == (style == "gpt2")
    assert_model_matches(reference, scenario_results("memory_tp2_sequence_parallel_model")[style])


def test_moe_memory_trains_at_ep2_as_one_process(scenario_results):
    reference = scenario_results("memory_moe_reference_training")
    assert len(reference) == 3 and reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    assert_training_matches(reference, scenario_results("memory_moe_ep2_training"), tol=MOE_TOL)


def test_moe_memory_objective_holds_every_segments_router_loss(scenario_results):
    """Each segment routes its own tokens, so the objective is the language-model loss plus the router loss of
    every MoE layer's forward in every segment, not only the last segment's."""
    result = scenario_results("memory_moe_router_losses")
    assert len(result["router_losses"]) == SEGMENTS * result["moe_layers"] == 6
    assert min(result["router_losses"]) > 0
    assert result["loss"] - result["language_model_loss"] == pytest.approx(sum(result["router_losses"]), abs=1e-6)


def test_moe_metrics_of_a_memory_model_are_its_last_segments(scenario_results):
    """As for any model, the figures of the last forward of each MoE layer: with memory, the last segment's,
    its memory positions routed like its tokens."""
    metrics = scenario_results("memory_moe_router_losses")["metrics"]
    assert [layer["layer"] for layer in metrics] == [0, 1]
    top_k, batch = 2, 8
    for layer in metrics:
        assert sum(layer["tokens_per_expert"]) == (SEGMENT_LEN + 2 * MEM_TOKENS) * batch * top_k


def test_memory_parameter_is_saved_and_resumed_like_any_other(scenario_results):
    run = scenario_results("memory_dp2_zero3_training")
    assert "memory.weight" in run["saved_names"] and run["saved_memory"].shape == (4, 64)
    assert torch.isfinite(run["saved_memory"]).all() and len(set(run["saved_memory"][:, 0].tolist())) == 4, \
        "distinct memory vectors"
    assert [r["step"] for r in run["resumed"]] == [3]
    assert [(r["loss"], r["grad_norm"]) for r in run["resumed"]] == \
        [(r["loss"], r["grad_norm"]) for r in run["straight"][2:]], "resuming at step 2 must give step 3 exactly"


@pytest.mark.parametrize("args,expected", [
    ([*MEMORY, "data.seq_len=100"], "data.seq_len=100 is not a multiple of model.memory.segment_len=64"),
    (["model.memory.num_mem_tokens=40", "model.memory.segment_len=64"],
     "model.memory: a segment is model.memory.segment_len=64 tokens between 2 x model.memory.num_mem_tokens=40 "
     "memory tokens, more than model.max_seq_len=128 positions"),
    (["model.memory.num_mem_tokens=8"], "model.memory.segment_len: field required"),
    ([*MEMORY, "model.memory.bptt_segments=-2"], "model.memory.bptt_segments: input should be greater than or equal "
     "to -1; got -2"),
    (["--nproc", "2", "parallel.pp=2", *MEMORY], "model.memory with parallel.pp=2: recurrent memory is not yet built "
     "for pipelines"),
    (["--nproc", "4", "parallel.tp=4", "parallel.sequence_parallel=true", "model.memory.num_mem_tokens=7",
      "model.memory.segment_len=64"],
     "parallel.sequence_parallel splits each segment of model.memory.segment_len=64 + 2 x "
     "model.memory.num_mem_tokens=7 = 78 positions over parallel.tp=4 ranks; make that sum divisible by it"),
    (["model.arch=t5", "model.norm=rmsnorm", "data.span_corruption={}", *MEMORY],
     "model.memory applies to model.arch=gpt only; remove it"),
])
def test_bad_memory_config_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", TINY, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("parallax: error: "), err
    assert expected in err, err


def test_a_memory_window_may_exceed_max_seq_len_when_each_segment_fits():
    cfg = load_config(TINY, [*MEMORY, "data.seq_len=512"])
    assert cfg.model.memory.bptt_segments == -1 and cfg.data.seq_len == 8 * cfg.model.memory.segment_len
    assert load_config(TINY, []).model.memory is None


def test_memory_layouts_are_accepted():
    """Sequence parallelism splits a segment (62 + 2 x 9 positions), not the window, so the window need not
    divide over TP; MoE with memory loads at EP=2."""
    cfg = load_config(TINY, ["parallel.tp=4", "parallel.sequence_parallel=true", "model.memory.num_mem_tokens=9",
                             "model.memory.segment_len=62", "data.seq_len=186"])
    assert cfg.parallel.sequence_parallel and cfg.data.seq_len % 4
    assert load_config("configs/gpt-moe-tiny.yaml", ["parallel.ep=2", *MEMORY]).model.moe is not None


def test_a_memory_model_has_no_hugging_face_twin():
    """export refuses a memory model in one line instead of writing a plain GPT-2 that silently drops the memory
    (generate decodes it natively: tests/test_memory_generate.py)."""
    from models.huggingface import HuggingFaceError, twin_for

    with pytest.raises(HuggingFaceError, match="model.memory: a recurrent memory model has no Hugging Face twin") as e:
        twin_for(load_config(TINY, MEMORY).model)
    assert "\n" not in str(e.value)
    assert twin_for(load_config(TINY, []).model).NAME
