"""Issue 2: a wrong config gives one line naming the field and what to do, and a non-zero exit."""
import subprocess
import sys

import pytest

from launcher.cli import main
from launcher.config import ConfigError, load_config
from launcher.slurm.submit import time_limit_seconds
from tests.data.corpora import write_id_tokenizer

TINY = "configs/gpt-tiny.yaml"
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--dry-run"]


@pytest.mark.parametrize("args,expected", [
    (["parallel.tp=3"], "model.num_heads=4 is not divisible by parallel.tp=3; choose parallel.tp from [1, 2, 4]"),
    (["--nproc", "3", "parallel.tp=2"], "world size 3 is not divisible by tp x pp = 2x1"),
    (["optim.lrr=1e-3"], "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["modle.hidden_size=8"], "unknown key 'modle' (did you mean 'model'?)"),
    (["model.hidden_size=0"], "model.hidden_size: input should be greater than 0; got 0"),
    (["train.micro_batch_size=-2"], "train.micro_batch_size: input should be greater than 0; got -2"),
    (["optim.lr=fast"], "optim.lr: input should be a valid number"),
    (["parallel.zero_stage=4"], "parallel.zero_stage: input should be 0, 1, 2 or 3; got 4"),
    (["train.eval_batches=0"], "train.eval_batches: input should be greater than 0; got 0"),
    (["checkpoint.checksum_block_bytes=2"], "checkpoint.checksum_block_bytes: input should be greater than or equal to 4; got 2"),
    (["model.norm=batchnorm"], "model.norm: input should be 'layernorm' or 'rmsnorm'; got 'batchnorm'"),
    (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=128"),
    (["model.num_heads=3"], "model.hidden_size=256 is not divisible by model.num_heads=3"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=127"],
     "parallel.sequence_parallel needs data.seq_len=127 divisible by parallel.tp=2"),
    (["model.num_kv_heads=1", "parallel.tp=2"],
     "model.num_kv_heads=1 is not divisible by parallel.tp=2: each TP rank holds whole key/value heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
    (["model.mlp=relu"], "model.mlp: input should be 'gelu' or 'swiglu'; got 'relu'"),
    (["model.arch=t5", "model.norm=rmsnorm", "model.mlp=swiglu", "data.span_corruption={}"],
     "model.mlp applies to model.arch=gpt only; remove it"),
    (["model.hidden_size=[1"], "override 'model.hidden_size=[1': its value is not valid YAML (expected ',' or ']', but "
     "got '<stream end>'); write a YAML value, e.g. 8, 3e-4, true or [1, 2], quoting text that starts with a symbol"),
    (["model.hidden_size=@x"], "override 'model.hidden_size=@x': its value is not valid YAML (found character '@' that "
     "cannot start any token); write a YAML value, e.g. 8, 3e-4, true or [1, 2], quoting text that starts with a symbol"),
    (["parallel.tp=4", "model.vocab_multiple=6"], "model.vocab_multiple=6 is not divisible by parallel.tp=4: each TP "
     "rank holds an equal share of the padded vocabulary; choose parallel.tp from [1, 2] or set "
     "model.vocab_multiple to a multiple of 4, e.g. 12"),
    ([".=5"], "override '.=5' is not of the form section.field=value, e.g. parallel.tp=2"),
    (["model..hidden_size=8"], "override 'model..hidden_size=8' is not of the form section.field=value, e.g. parallel.tp=2"),
])
def test_bad_config_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", TINY, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parallax: error: "), err
    assert expected in err


MOE = "configs/gpt-moe-tiny.yaml"


@pytest.mark.parametrize("config,args,expected", [
    (MOE, ["--nproc", "2", "model.moe.num_experts=3"],
     "model.moe.num_experts=3 is not divisible by parallel.ep=2; choose parallel.ep from [1, 3]"),
    (MOE, ["--nproc", "2", "parallel.ep=4"],
     "parallel.ep=4 does not divide the data-parallel size 2 (2 ranks / tp 1), which the experts are sharded over"),
    (MOE, ["--nproc", "4", "parallel.tp=2", "parallel.ep=4"], "parallel.ep=4 does not divide the data-parallel size 2"),
    (MOE, ["parallel.ep=1", "model.moe.num_experts=1"], "model.moe.top_k=2 exceeds model.moe.num_experts=1"),
    (MOE, ["--nproc", "2", "parallel.zero_stage=3"], "parallel.zero_stage=3 does not support MoE layers"),
    (TINY, ["--nproc", "2", "parallel.ep=2"], "parallel.ep=2 shards experts, but the model has none"),
])
def test_bad_moe_layout_is_one_line_naming_the_field(capsys, config, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("config,args,expected", [
    (TINY, ["--nproc", "2", "parallel.pp=2", "parallel.zero_stage=2"],
     "parallel.zero_stage=2 with parallel.pp=2: ZeRO-2/3 partition gradients as each backward runs, which a pipeline "
     "runs once per micro-batch and stage; use parallel.zero_stage=1"),
    (TINY, ["--nproc", "2", "parallel.pp=2", "parallel.zero_stage=3"], "parallel.zero_stage=3 with parallel.pp=2"),
    ("configs/t5-tiny.yaml", ["--nproc", "2", "parallel.pp=2"],
     "parallel.pp=2: pipelines are built for decoders (model.arch=gpt); split a model.arch=t5 with parallel.tp and "
     "parallel.zero_stage=3 instead, and set parallel.pp=1"),
    (TINY, ["--nproc", "2", "parallel.pp=2", "train.precision=fp16"],
     "train.precision=fp16 with parallel.pp=2: the loss scale is applied at the last stage only; use "
     "train.precision=bf16"),
    (TINY, ["--nproc", "2", "parallel.pp=2", "parallel.zero_stage=0", "train.precision=bf16"],
     "train.precision=bf16 at parallel.zero_stage=0 with parallel.pp=2 and a tied embedding"),
    (TINY, ["--nproc", "4", "parallel.pp=4", "parallel.virtual_stages=2"],
     "model.num_layers=4 is fewer than parallel.pp x parallel.virtual_stages = 8 stages"),
    (TINY, ["--nproc", "2", "parallel.pp=2", "parallel.pipeline_layers=[1,2]"],
     "parallel.pipeline_layers=[1, 2] must give 2 stages (parallel.pp x parallel.virtual_stages) whose layers sum "
     "to model.num_layers=4"),
    (TINY, ["--nproc", "2", "parallel.virtual_stages=2"],
     "parallel.virtual_stages=2 interleaves pipeline stages, but parallel.pp=1; set parallel.pp to 2 or more"),
    (TINY, ["--nproc", "2", "parallel.pp=2", "parallel.virtual_stages=2", "train.grad_accum=3"],
     "train.grad_accum=3 micro-batches: the interleaved schedule (parallel.virtual_stages=2) sends them through in "
     "groups of parallel.pp=2; use a multiple of 2"),
    (TINY, ["--nproc", "3", "parallel.pp=2"],
     "world size 3 is not divisible by tp x pp = 1x2; use a multiple of 2 ranks or change parallel.tp or parallel.pp"),
])
def test_a_pipeline_that_cannot_work_is_one_line_saying_what_to_use(capsys, config, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", config, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("args,expected", [
    (["model.memory={segment_len: 64}"], "model.memory applies to model.arch=gpt only; remove it"),
    (["model.mlp=swiglu"], "model.mlp applies to model.arch=gpt only; remove it"),
    (["model.num_kv_heads=2"], "model.num_kv_heads applies to model.arch=gpt only; remove it"),
    (["data.masked_lm=null", "data.fact_task={}"],
     "data.fact_task is a task for decoders (model.arch=gpt, with model.memory); remove it"),
    (["data.span_corruption={}"],
     "data.span_corruption and data.masked_lm are different training objectives; keep one"),
    (["train.memory_curriculum={segments: [1, 2], at_steps: [1, 10]}"],
     "train.memory_curriculum grows the segments of model.memory; add a model.memory section"),
    (["--nproc", "2", "parallel.pp=2"], "parallel.pp=2: pipelines are built for decoders (model.arch=gpt); split a "
     "model.arch=bert with parallel.tp and parallel.zero_stage=3 instead, and set parallel.pp=1"),
])
def test_an_encoder_asked_for_a_causal_only_feature_is_one_line(capsys, args, expected):
    """Issue 27, point 7: recurrent memory, its task and curriculum, pipelines and the decoders' MLP and grouped
    attention are refused for model.arch=bert before anything starts (generate: tests/test_fill_mask.py)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/bert-tiny.yaml", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("argv,expected", [
    (["train"], "parallax train: error: the following arguments are required: config"),
    (["eval"], "parallax eval: error: the following arguments are required: RUN|CHECKPOINT"),
    (["plan"], "parallax plan: error: the following arguments are required: config"),
    (["submit", "--nodes", "1", "--gpus-per-node", "0"], "parallax submit: error: the following arguments are required: config"),
    (["train", TINY, "--nproc", "0"], "parallax train: error: argument --nproc: give a whole number of at least 1; got 0"),
    (["train", TINY, "--nproc", "-2"], "parallax train: error: argument --nproc: give a whole number of at least 1; got -2"),
    (["train", TINY, "--nproc", "two"], "parallax train: error: argument --nproc: give a whole number of at least 1; got two"),
    (["train", TINY, "--max-restarts", "-1"],
     "parallax train: error: argument --max-restarts: give a whole number of at least 0; got -1"),
    (["eval", "runs/gpt-tiny", "--nproc", "0"],
     "parallax eval: error: argument --nproc: give a whole number of at least 1; got 0"),
    (["eval", "runs/gpt-tiny", "--step", "-1"],
     "parallax eval: error: argument --step: give a whole number of at least 0; got -1"),
    (["export", "runs/gpt-tiny", "--out", "hf", "--step", "-1"],
     "parallax export: error: argument --step: give a whole number of at least 0; got -1"),
    (["generate", "runs/gpt-tiny", "--prompt", "def", "--step", "-1"],
     "parallax generate: error: argument --step: give a whole number of at least 0; got -1"),
    (["checkpoint", "consolidate", "runs/gpt-tiny", "--step", "-1"],
     "parallax checkpoint consolidate: error: argument --step: give a whole number of at least 0; got -1"),
    (["plan", TINY, "--search", "--top", "-1"], "parallax plan: error: argument --top: give a whole number of at least 1; got -1"),
    (["submit", TINY, *CPU_JOB, "--tasks-per-node", "0"],
     "parallax submit: error: argument --tasks-per-node: give a whole number of at least 1; got 0"),
    (["submit", TINY, *CPU_JOB, "--warning-seconds", "-5"],
     "parallax submit: error: argument --warning-seconds: give a whole number of at least 1; got -5"),
])
def test_bad_arguments_are_refused_while_they_are_parsed(capsys, argv, expected):
    """One line naming the flag, exit code 2 (argparse printed its usage above it)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.splitlines() == [expected], err


@pytest.mark.parametrize("flag,value", [("--num-shards", "0"), ("--max-bytes", "0"), ("--max-bytes", "-5")])
def test_prepare_data_refuses_a_bad_count_before_creating_anything(capsys, tmp_path, flag, value):
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare-data", str(out), flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.splitlines() == [f"parallax prepare-data: error: argument {flag}: give a whole number of at least 1; got {value}"]
    assert not out.exists()


@pytest.mark.parametrize("args,expected", [
    (["--time", "abc"], "--time=abc is not a SLURM time limit; give MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, "
     "DAYS-HOURS, DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS, e.g. 04:00:00"),
    (["--time", "1:2:3:4"], "--time=1:2:3:4 is not a SLURM time limit"),
    (["--time", "00:01:00", "--warning-seconds", "300"], "--warning-seconds=300 is not shorter than --time=00:01:00 "
     "(60 s): the job would be told to stop before it trained; lower --warning-seconds or raise --time"),
    (["--time", "5"], "--warning-seconds=300 is not shorter than --time=5 (300 s)"),
])
def test_bad_submit_time_is_one_line(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", TINY, *CPU_JOB, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("time,seconds", [("90", 5400), ("10:30", 630), ("04:00:00", 14400), ("2-12", 216000),
                                          ("1-0:30", 88200), ("1-00:00:01", 86401), ("UNLIMITED", None), ("0", None)])
def test_submit_reads_every_slurm_time_format(time, seconds):
    assert time_limit_seconds(time) == seconds


def test_missing_and_malformed_files(capsys, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [1,\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    for path, expected in [(tmp_path / "nope.yaml", "nope.yaml does not exist"),
                           (bad_yaml, "bad.yaml line 2 is not valid YAML"),
                           (binary, f"config file {binary} is not UTF-8 text (byte 0xff at offset 0); pass a YAML "
                            "file saved as UTF-8, such as configs/gpt-tiny.yaml")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_vocab_size_below_the_tokenizers_is_refused_before_the_model_is_built(tmp_path):
    """Ids from model.vocab_size up have no embedding row: the first step died in an IndexError."""
    tokenizer = write_id_tokenizer(tmp_path / "tokenizer.json", 397)  # 400 tokens with the 3 special ones
    cfg = load_config(TINY, ["model.vocab_size=10", f"data.tokenizer={tokenizer}"])
    with pytest.raises(ConfigError) as error:
        cfg.check_vocab_size()
    assert str(error.value) == (f"model.vocab_size=10 is smaller than the 400 tokens of tokenizer {tokenizer}: ids from "
                                "10 up have no embedding row; raise model.vocab_size to 400 or more, or remove it to "
                                "take the tokenizer's")
    assert cfg.check_vocab_size(tokenized=False) == 10  # the caller's own batches, not the tokenizer's ids
    assert load_config(TINY, [f"data.tokenizer={tokenizer}"]).check_vocab_size() == 400
    assert load_config(TINY, ["model.vocab_size=512", f"data.tokenizer={tokenizer}"]).check_vocab_size() == 512


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["parallel.tp=2", "optim.lr=3e-4", "parallel.sequence_parallel=true"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 3e-4 and cfg.parallel.sequence_parallel is True


def test_error_inside_a_rank_is_one_line_and_exit_code_2():
    """fp16 is refused on CPU once the rank knows its device: a real launch, through the console script."""
    parallax = [sys.executable, "-c", "from launcher.cli import main; main()"]
    proc = subprocess.run([*parallax, "train", TINY, "train.precision=fp16", "train.steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert error_lines == ["parallax: error (rank 0): train.precision=fp16 needs CUDA (DeepSpeed's loss scaler); "
                           "use bf16 or fp32 on CPU"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
