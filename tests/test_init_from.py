"""Issue 16: model.init_from takes the model, weights and tokenizer of a Hugging Face directory (GPT-2,
Llama, T5; issue 27: BERT, RoBERTa); bad input is one line and exit code 2. The runs themselves are
tests/distributed/scenarios_init_from.py."""
import json
import shutil

import pytest
import torch

from launcher.cli import main
from launcher.config import load_config
from tests.data.corpora import write_id_tokenizer
from tests.distributed.scenarios_init_from import (ENCODER_LAYOUTS, GPT_LAYOUTS, SEQ_LEN, T5_LAYOUTS, VOCAB,
                                                   write_gpt2_directory, write_t5_directory)

TOL = 1e-5


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_gpt2_directory(tmp_path_factory.mktemp("init-from") / "gpt2")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_t5_directory(tmp_path_factory.mktemp("init-from") / "t5")


def _without(gpt2_dir, tmp_path, *names):
    copy = tmp_path / "copy"
    shutil.copytree(gpt2_dir, copy)
    for name in names:
        (copy / name).unlink()
    return copy


def _config_json(gpt2_dir, tmp_path, **fields):
    copy = _without(gpt2_dir, tmp_path)
    (copy / "config.json").write_text(json.dumps(json.loads((copy / "config.json").read_text()) | fields))
    return copy


def _rewritten(gpt2_dir, tmp_path, tensors_as, only=None, **fields):
    """A copy whose model.safetensors is rewritten with safetensors' save_file, its tensors (or `only` one)
    as dtype `tensors_as`, and whose config.json has `fields` (None: removed)."""
    from safetensors.torch import load_file, save_file

    copy = _config_json(gpt2_dir, tmp_path, **fields)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    weights = load_file(copy / "model.safetensors")
    save_file({name: t.to(tensors_as) if only in (None, name) else t for name, t in weights.items()},
              copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def _json_list_config(gpt2_dir, tmp_path):
    copy = _without(gpt2_dir, tmp_path)
    (copy / "config.json").write_text("[]")
    return copy


QKV = "transformer.h.0.attn.c_attn.weight"  # as GPT2LMHeadModel names it


# --- the runs: transformers' logits at every layout -------------------------------------------------

@pytest.mark.parametrize("name,layout", [
    *[(name, layout) for name in ("init_from_gpt2", "init_from_llama") for layout in GPT_LAYOUTS],
    *[("init_from_t5", layout) for layout in T5_LAYOUTS],
])
def test_first_step_computes_what_transformers_computes(scenario_results, name, layout):
    result = scenario_results(name)
    theirs, ours = result["transformers"], result[layout]
    assert theirs["logits"].shape[::2] == (4, VOCAB) and ours["logits"].shape == (*theirs["logits"].shape[:2], 256)
    torch.testing.assert_close(ours["logits"][..., :VOCAB], theirs["logits"], atol=TOL, rtol=0)
    assert not ours["logits"][..., VOCAB:].any(), "the padded vocabulary's rows are zero"
    # train() itself started from the directory: its first loss is the one these weights give.
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOL)


@pytest.mark.parametrize("name", ["init_from_bert", "init_from_roberta"])
@pytest.mark.parametrize("layout", ENCODER_LAYOUTS)
def test_an_encoder_run_starts_from_what_transformers_computes(scenario_results, name, layout):
    """Issue 27: BERT and RoBERTa directories (vocabulary 401, padded to 512) at TP=2 with SP and at ZeRO-3;
    the loss is the masked-LM loss over the masked positions."""
    result = scenario_results(name)
    theirs, ours = result["transformers"], result[layout]
    assert theirs["logits"].shape == (4, SEQ_LEN, 401) and ours["logits"].shape == (4, SEQ_LEN, 512)
    torch.testing.assert_close(ours["logits"][..., :401], theirs["logits"], atol=TOL, rtol=0)
    assert not ours["logits"][..., 401:].any(), "the padded vocabulary's rows are zero"
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=TOL)


def test_a_pipelined_run_starts_from_the_directory(scenario_results):
    """Issue 25: each stage took its own layers from the directory (a stage refused the weights of the others)."""
    result = scenario_results("init_from_gpt2_at_pp2")
    assert result["loss"] == pytest.approx(result["transformers"]["loss"], abs=TOL)


# --- the config: the directory's model and tokenizer ------------------------------------------------

def test_unset_fields_and_the_tokenizer_come_from_the_directory(gpt2_dir):
    cfg = load_config(None, [f"model.init_from={gpt2_dir}", "model.hidden_size=64", "model.norm_eps=1e-5",
                             f"data.seq_len={SEQ_LEN}", "parallel.tp=2"])
    m = cfg.model
    assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.max_seq_len, m.vocab_size) == ("gpt", 2, 64, 4, SEQ_LEN, VOCAB)
    assert (m.ffn_size, m.dropout, m.tied, m.biased) == (256, 0.0, True, True)
    assert cfg.data.tokenizer == gpt2_dir / "tokenizer.json"


def test_a_tokenizer_the_run_sets_is_kept_when_it_fits(gpt2_dir, tmp_path):
    smaller = write_id_tokenizer(tmp_path / "small.json", 50)
    cfg = load_config(None, [f"model.init_from={gpt2_dir}", f"data.tokenizer={smaller}", f"data.seq_len={SEQ_LEN}"])
    assert cfg.data.tokenizer == smaller


def test_the_weights_are_padded_as_the_run_pads(gpt2_dir):
    from models.huggingface import import_directory

    cfg = load_config(None, [f"model.init_from={gpt2_dir}", "model.vocab_multiple=8", f"data.seq_len={SEQ_LEN}"])
    assert import_directory(gpt2_dir, cfg.model).state["embedding.weight"].shape == (VOCAB, 64)


def test_a_checkpoint_resumes_once_its_directory_moved_and_refuses_another_model(gpt2_dir, tmp_path):
    """A checkpoint's weights replace the directory's, so resuming compares the model, not where its step-0
    weights came from: comparing `init_from` too refused every resume once the directory had moved."""
    from parallel.checkpoint import CheckpointError
    from parallel.checkpoint.manager import check_same_model

    checkpoint = tmp_path / "step-00000010"
    saved = load_config(None, [f"model.init_from={gpt2_dir}", f"data.seq_len={SEQ_LEN}"]).model_dump(mode="json")
    moved = tmp_path / "moved"
    shutil.copytree(gpt2_dir, moved)
    ours = load_config(None, [f"model.init_from={moved}", f"data.seq_len={SEQ_LEN}"]).model
    check_same_model(checkpoint, saved, ours)
    deeper = {**saved, "model": {**saved["model"], "num_layers": 3}}
    with pytest.raises(CheckpointError, match=f"^checkpoint {checkpoint} has model.num_layers=3 but this run has "
                                              "model.num_layers=2; resume with the model it was trained with"):
        check_same_model(checkpoint, deeper, ours)


def test_damaged_weights_are_named(gpt2_dir, tmp_path):
    """Found only when a rank reads them, where the rank's one line says it (launcher/entry.py)."""
    from models.huggingface import HuggingFaceError, import_directory

    copy = _without(gpt2_dir, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HuggingFaceError, match=f"{weights}: unreadable .*; the file is partial or damaged"):
        import_directory(copy)


@pytest.mark.parametrize("dtype,fields,expected", [
    (torch.int8, {}, f"{QKV} is int8, not floating point (a quantized checkpoint?); Parallax reads only a model's "
                     "floating-point weights"),
    (torch.float16, {}, f"{QKV} is float16 but config.json's dtype is float32: these are not the weights the "
                        "model was saved with"),
    # transformers 4's name for the field; every tensor differs from it, and the file's first is named
    (torch.float32, {"dtype": None, "torch_dtype": "bfloat16"},
     "transformer.h.0.attn.c_attn.bias is float32 but config.json's torch_dtype is bfloat16: these are not the "
     "weights the model was saved with"),
])
def test_weights_of_another_dtype_than_the_model_was_saved_in_are_refused(gpt2_dir, tmp_path, dtype, fields, expected):
    from models.huggingface import HuggingFaceError, import_directory

    copy = _rewritten(gpt2_dir, tmp_path, dtype, only=QKV, **fields)
    with pytest.raises(HuggingFaceError) as error:
        import_directory(copy)
    assert str(error.value) == f"{copy / 'model.safetensors'}: {expected}"


def test_a_directory_saved_in_bf16_is_taken_exactly(gpt2_dir, tmp_path):
    from models.huggingface import import_directory, read_weights

    copy = _rewritten(gpt2_dir, tmp_path, torch.bfloat16, dtype="bfloat16")
    state = import_directory(copy).state
    assert state["blocks.0.attn.proj.weight"].dtype == torch.float32
    assert torch.equal(state["blocks.0.attn.proj.weight"], read_weights(copy)["transformer.h.0.attn.c_proj.weight"].float().T)


# --- bad input: one line, exit code 2 ---------------------------------------------------------------

@pytest.mark.parametrize("make_dir,args,expected", [
    (lambda d, t: t / "nowhere", [], "model.init_from: {dir}: no such directory"),
    (lambda d, t: _without(d, t, "config.json"), [], "model.init_from: {dir}/config.json: not found"),
    (lambda d, t: _without(d, t, "model.safetensors"), [], "model.init_from: {dir}: no model.safetensors"),
    (lambda d, t: _config_json(d, t, model_type="albert"), [], "model_type 'albert' has no Parallax twin; Parallax holds gpt2"),
    (lambda d, t: _config_json(d, t, n_embd="64"), [],  # issue 27: was a 40-line traceback from AutoConfig
     "model.init_from: {dir}/config.json: transformers cannot read it (Validation error for field 'n_embd': "
     "TypeError: Field 'n_embd' expected int, got str (value: '64')); fix or replace the file"),
    (lambda d, t: _json_list_config(d, t), [],
     "{dir}/config.json: transformers cannot read it (a JSON object of fields is expected, not list)"),
    (lambda d, t: _config_json(d, t, activation_function="relu"), [],
     "config.json: activation_function='relu'; Parallax's GPT-2 has 'gelu_new'"),
    (lambda d, t: _config_json(d, t, n_head=3), [],
     "config.json gives a model Parallax cannot build: Value error, model.hidden_size=64 is not divisible by model.num_heads=3"),
    (lambda d, t: d, ["model.hidden_size=256"],
     "model.hidden_size=256 but {dir}/config.json has 64; remove it to take the directory's"),
    (lambda d, t: d, ["model.norm=rmsnorm"], "model.norm=rmsnorm but {dir}/config.json has layernorm"),
    (lambda d, t: _without(d, t, "tokenizer.json"), [], "{dir} has no tokenizer.json; set data.tokenizer"),
    (lambda d, t: d, ["data.tokenizer={big}"],
     "data.tokenizer={big} has 303 tokens but {dir}/config.json has vocab_size 200: the model has no row for its last ids"),
    (lambda d, t: d, ["parallel.tp=3"], "model.num_heads=4 is not divisible by parallel.tp=3"),
    (lambda d, t: _rewritten(d, t, torch.int8, only=QKV), [],  # refused before any rank starts
     f"model.init_from: {{dir}}/model.safetensors: {QKV} is int8, not floating point"),
])
def test_bad_input_is_one_line(gpt2_dir, tmp_path, capsys, make_dir, args, expected):
    directory = make_dir(gpt2_dir, tmp_path)
    big = write_id_tokenizer(tmp_path / "big.json", 300)
    err = _train_error(directory, tmp_path, capsys, *[a.format(big=big) for a in args])
    assert expected.format(dir=directory, big=big) in err, err


@pytest.mark.parametrize("field,token,at", [("decoder_start_token_id", "<pad>", 1), ("eos_token_id", "<|endoftext|>", 0)])
def test_a_t5_that_starts_or_ends_its_decoder_elsewhere_is_refused(t5_dir, tmp_path, capsys, field, token, at):
    """Span corruption starts the decoder from the tokenizer's <pad> and ends the targets with its
    end-of-document token; a model that learned others would be taught new ones, silently."""
    directory = _config_json(t5_dir, tmp_path, **{field: 2})
    err = _train_error(directory, tmp_path, capsys)
    assert (f"model.init_from: {directory}/config.json has {field}=2 but data.tokenizer={directory}/tokenizer.json has "
            f"{token} at {at}, where Parallax's T5 span corruption puts it") in err, err


def _train_error(directory, tmp_path, capsys, *args) -> str:
    """What `parallax train` from `directory` prints: one line, exit code 2."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  init_from: {directory}\ndata:\n  seq_len: {SEQ_LEN}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("parallax: error: "), err
    return err
