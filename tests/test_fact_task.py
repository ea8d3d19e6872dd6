"""Issue 26's data and evaluation: the built-in long-context task (data.fact_task), train.memory_curriculum
and its exact resume, and `parallax eval --segments`.

The task's samples are checked token by token here; that reading a sample a segment at a time scores what the
whole forward scores, and holds no more at segment 63 than at 8, is a scenario (scenarios_fact_task.py). Whether
a model learns the task is bench/memory.py's question, not a test's.
"""
import json

import numpy
import pytest

from data_pipeline.config import DataConfig, FactTaskConfig
from data_pipeline.fact_task import IGNORE_INDEX, FactTask
from launcher.cli import main
from launcher.config import load_config
from launcher.curriculum import MemoryCurriculum
from tests.distributed.scenarios_fact_task import HELD_AT

CONFIG = "configs/rmt-fact-tiny.yaml"
SEGMENT = 32


@pytest.fixture(scope="module")
def tasks():
    cfg = DataConfig(fact_task=FactTaskConfig())
    return {held_out: FactTask.build(cfg, SEGMENT, seed=7, held_out=held_out) for held_out in (False, True)}


def _find(haystack: numpy.ndarray, needle: numpy.ndarray) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if (haystack[i:i + len(needle)] == needle).all()]


@pytest.mark.parametrize("segments", [1, 2, 5])
def test_a_sample_plants_one_fact_before_the_question_about_it(tasks, segments):
    task = tasks[False]
    for index in range(40):
        parts = list(task.segments(index, segments))
        assert len(parts) == segments and all(len(p) == SEGMENT for p in parts)
        draw = task._draw(index, segments)
        fact = numpy.concatenate([task.facts[draw.key], [task.values[draw.value], task.period]])
        where = [(s, i) for s, part in enumerate(parts) for i in _find(part, fact)]
        assert len(where) == 1, f"sample {index}: the fact must be planted once, found at {where}"
        fact_segment, offset = where[0]
        assert fact_segment < segments - 1 if segments > 1 else offset + len(fact) <= SEGMENT - len(task.questions[0])
        question = task.questions[draw.key]
        assert (parts[-1][-len(question):] == question).all(), "the last segment ends with the question"
        batch = task.batch([index], segments)
        assert (batch["input_ids"][0].numpy() == numpy.concatenate(parts)).all()
        labels = batch["labels"][0]
        assert (labels[:-1] == IGNORE_INDEX).all() and labels[-1] == task.values[draw.value] == task.answer(index, segments)
        window = task.batch([index], segments, last_tokens=SEGMENT)  # what a model without memory sees
        assert (window["input_ids"][0].numpy() == parts[-1]).all() and window["labels"][0, -1] == labels[-1]


def test_samples_are_a_function_of_seed_index_and_segments(tasks):
    task = tasks[False]
    again = FactTask.build(DataConfig(fact_task=FactTaskConfig()), SEGMENT, seed=7, held_out=False)
    other_seed = FactTask.build(DataConfig(fact_task=FactTaskConfig()), SEGMENT, seed=8, held_out=False)
    same = [(task.batch([i], 3)["input_ids"] == again.batch([i], 3)["input_ids"]).all() for i in range(10)]
    assert all(same)
    assert not all((task.batch([i], 3)["input_ids"] == other_seed.batch([i], 3)["input_ids"]).all() for i in range(10))
    assert not (task.batch([0], 3)["input_ids"] == task.batch([1], 3)["input_ids"]).all()


def test_answers_are_spread_over_the_values_and_filler_is_held_out_for_evaluation(tasks):
    task = tasks[False]
    answers = numpy.array([task.answer(i, 4) for i in range(3000)])
    shares = numpy.array([(answers == value).mean() for value in task.values])
    assert len(task.values) == 10 and (abs(shares - 0.1) < 0.025).all(), shares
    train, held_out = tasks[False].filler, tasks[True].filler
    assert len(train) > len(held_out) > 10_000
    assert not _find(train[:200_000], held_out[1000:1016]), "evaluation filler must come from held-out documents"


def test_the_fact_at_the_start_is_the_first_segments_first_tokens():
    task = FactTask.build(DataConfig(fact_task=FactTaskConfig(position="start")), SEGMENT, seed=7, held_out=False)
    for index in range(10):
        first = next(task.segments(index, 4))
        draw = task._draw(index, 4)
        assert (first[:len(task.facts[draw.key])] == task.facts[draw.key]).all()


def test_the_curriculum_grows_the_segments_at_its_steps_and_varies_them_deterministically():
    fixed = MemoryCurriculum(load_config(CONFIG, ["train.memory_curriculum.vary_n_segments=false"]))
    assert [fixed.segments_at(step) for step in (1, 299, 300, 599, 600, 900, 5000)] == [1, 1, 2, 2, 3, 4, 4]
    varied = MemoryCurriculum(load_config(CONFIG))
    counts = [varied.segments_at(step) for step in range(900, 1300)]
    assert set(counts) == {1, 2, 3, 4} and counts == [varied.segments_at(s) for s in range(900, 1300)]
    assert {varied.segments_at(step) for step in range(300, 600)} == {1, 2}
    assert MemoryCurriculum(load_config(CONFIG, ["train.memory_curriculum=null"])).segments_at(7) == 4


@pytest.mark.parametrize("args,expected", [
    (["train.memory_curriculum.at_steps=[2, 300, 600, 900]"], "train.memory_curriculum.at_steps=[2, 300, 600, 900] "
     "must start at 1 and increase"),
    (["train.memory_curriculum.at_steps=[1, 300]"], "train.memory_curriculum: 4 segment counts but 2 at_steps"),
    (["train.memory_curriculum.segments=[1, 8]", "train.memory_curriculum.at_steps=[1, 9]"],
     "train.memory_curriculum reaches 8 segments of model.memory.segment_len=32 tokens, more than data.seq_len=128"),
    (["model.memory=null", "data.fact_task=null"], "train.memory_curriculum grows the segments of model.memory"),
    (["data.fact_task.values=11"], "data.fact_task.values: input should be less than or equal to 10"),
    (["data.fact_task.eval_segments=[0]"], "eval_segments=[0]: give one or more segment counts"),
    (["--nproc", "2", "model.memory=null", "data.seq_len=32", "parallel.pp=2"],
     "data.fact_task with parallel.pp=2: its evaluation reads a segment at a time"),
])
def test_bad_task_or_curriculum_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", CONFIG, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("parallax: error: "), err
    assert expected in err, err


FAST = ["model.hidden_size=64", "train.micro_batch_size=4", "train.eval_interval=0", "logging.interval=1",
        "data.fact_task.eval_samples=16", "train.memory_curriculum.at_steps=[1, 2, 3, 4]"]


def _records(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_the_task_and_its_curriculum_resume_exactly_and_eval_scores_each_segment_count(tmp_path, capfd):
    """4 steps straight, against 2 steps, a stop, and 2 more resumed: the same losses and segment counts
    (the curriculum varies them), so the loader and the curriculum go on where they stopped. Then `parallax
    eval --segments` scores the checkpoint at each count, a segment at a time."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(["train", CONFIG, *FAST, "train.steps=4", f"logging.run_dir={straight}"])
    with pytest.raises(SystemExit) as stopped:
        main(["train", CONFIG, *FAST, "train.steps=4", "train.stop_at_step=2", f"logging.run_dir={split}"])
    assert stopped.value.code == 75
    main(["train", CONFIG, *FAST, "train.steps=4", f"logging.run_dir={split}"])
    expected = [(r["step"], r["segments"], r["loss"]) for r in _records(straight)]
    assert [s for _, s, _ in expected] != [expected[0][1]] * 4, "the curriculum must vary the segments"
    assert [(r["step"], r["segments"], r["loss"]) for r in _records(split)] == expected

    capfd.readouterr()
    main(["eval", str(straight), "--segments", "1,3", "--samples", "8"])
    out = capfd.readouterr().out
    assert "     1 segments: accuracy" in out and "     3 segments: accuracy" in out, out
    result = json.loads((straight / "checkpoints" / "step-00000004" / "eval.json").read_text())
    assert [(c["segments"], c["samples"]) for c in result["by_segments"]] == [(1, 8), (3, 8)]
    assert all(0 <= c["accuracy"] <= 1 and c["loss"] > 0 for c in result["by_segments"])


def test_segments_flag_needs_the_task(tmp_path, capsys):
    run = tmp_path / "plain"
    main(["train", "configs/gpt-tiny.yaml", "model.num_layers=1", "model.hidden_size=32", "data.seq_len=32",
          "train.steps=1", "train.micro_batch_size=2", "train.eval_interval=0", f"logging.run_dir={run}"])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(run), "--segments", "1,2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--segments and --samples score data.fact_task" in err


def test_reading_a_segment_at_a_time_scores_what_the_whole_forward_does(scenario_results):
    result = scenario_results("fact_task_eval_reference")
    streamed = result["streamed"]
    assert streamed["segments"] == 3 and streamed["samples"] == 12
    assert abs(streamed["loss"] - result["whole_loss"]) < 1e-5 and streamed["accuracy"] == result["whole_accuracy"]


def test_evaluation_holds_no_more_at_its_last_segment_than_at_its_eighth(scenario_results):
    """The live tensors after every eighth of 64 segments: a reader that kept the segments it read (or their
    outputs) would hold more with every one."""
    held = scenario_results("fact_task_eval_reference")["held_bytes"]
    assert sorted(held) == list(HELD_AT) and HELD_AT[0] == 8 and HELD_AT[-1] == 63
    assert max(held.values()) <= held[8] * 1.001, held


@pytest.mark.parametrize("layout", ["tp2", "dp2_zero3"])
def test_evaluation_gives_the_same_figures_at_every_layout(scenario_results, layout):
    reference = scenario_results("fact_task_eval_reference")["streamed"]
    figures = scenario_results("fact_task_eval_layouts")[layout]
    assert figures["samples"] == reference["samples"] and figures["accuracy"] == reference["accuracy"]
    assert abs(figures["loss"] - reference["loss"]) < 1e-5
