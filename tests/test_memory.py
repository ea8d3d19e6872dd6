"""Issue 26, its core: the recurrent memory transformer (model.memory) for the GPT family.

The scenarios are in tests/distributed/scenarios_memory.py: a model without memory is the decoder it was,
truncated BPTT really cuts the gradient, TP=2 and DP=2 at ZeRO-3 train as one process does over 3 steps
of 3-segment windows, and a checkpoint holds and resumes the memory parameter. Config errors are one line.
"""
import pytest
import torch

from launcher.cli import main
from launcher.config import load_config
from tests.test_parity import assert_training_matches

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


@pytest.mark.parametrize("layout", ["memory_tp2_training", "memory_dp2_zero3_training"])
def test_memory_trains_at_tp2_and_dp2_zero3_as_one_process(scenario_results, layout):
    reference = scenario_results("memory_reference_training")
    assert len(reference) == 3 and reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    run = scenario_results(layout)
    assert_training_matches(reference, run["straight"] if isinstance(run, dict) else run)


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
    (["--nproc", "2", "parallel.tp=2", "parallel.sequence_parallel=true", *MEMORY],
     "model.memory with parallel.sequence_parallel: not yet supported"),
    (["model.arch=t5", "model.norm=rmsnorm", "data.span_corruption={}", *MEMORY],
     "model.memory applies to model.arch=gpt only; remove it"),
])
def test_bad_memory_config_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", TINY, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("parallax: error: "), err
    assert expected in err, err


def test_moe_with_memory_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/gpt-moe-tiny.yaml", *MEMORY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "model.memory with model.moe: not yet" in err, err


def test_a_memory_window_may_exceed_max_seq_len_when_each_segment_fits():
    cfg = load_config(TINY, [*MEMORY, "data.seq_len=512"])
    assert cfg.model.memory.bptt_segments == -1 and cfg.data.seq_len == 8 * cfg.model.memory.segment_len
    assert load_config(TINY, []).model.memory is None


def test_a_memory_model_has_no_hugging_face_twin():
    """export refuses a memory model in one line instead of writing a plain GPT-2 that silently drops the memory
    (generate decodes it natively: tests/test_memory_generate.py)."""
    from models.huggingface import HuggingFaceError, twin_for

    with pytest.raises(HuggingFaceError, match="model.memory: a recurrent memory model has no Hugging Face twin") as e:
        twin_for(load_config(TINY, MEMORY).model)
    assert "\n" not in str(e.value)
    assert twin_for(load_config(TINY, []).model).NAME
