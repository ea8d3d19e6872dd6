"""Issue 16: `model.init_from` with a Hugging Face tokenizer, which names its special tokens otherwise than
Parallax: a Llama directory ends documents with `</s>` and has no pad token. The run takes the directory's
names (data.eod_token, data.pad_token), packs with them and exports them. The directory is written by
transformers itself, and its tokenizer has none of Parallax's `<|endoftext|>` and `<pad>`."""
import json

import pytest
import torch
from tokenizers import Tokenizer

from data_pipeline import build_dataloader
from launcher.cli import main
from launcher.config import load_config
from tests.data.corpora import doc_length, write_id_tokenizer, write_jsonl
from tests.test_export import _write_checkpoint, random_hf_model

EOS_ID = 2  # </s>, after <unk> and <s>


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return random_hf_model("llama", tmp_path_factory.mktemp("llama") / "hf", llama_tokens=True)


def _config(llama_dir, *overrides):
    return load_config(None, [f"model.init_from={llama_dir}", "data.seq_len=16", *overrides])


def test_the_run_takes_the_directory_eos_and_pads_with_it(llama_dir, tmp_path):
    data = _config(llama_dir).data
    assert (data.eod_token, data.pad_token) == ("</s>", "</s>")
    assert _config(llama_dir, "data.pad_token=<unk>").data.pad_token == "<unk>", "the run's own choice is kept"
    # The directory names its own tokenizer's tokens: a tokenizer the run gives keeps the run's names.
    parallax = write_id_tokenizer(tmp_path / "parallax.json", 100)
    data = _config(llama_dir, f"data.tokenizer={parallax}").data
    assert (data.eod_token, data.pad_token) == ("<|endoftext|>", "<pad>")


def test_documents_are_packed_with_the_directory_eos(llama_dir, tmp_path):
    """Every token of every document, in order, with `</s>` and nothing else between documents."""
    tokenizer = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    texts = [" ".join([f"d{i}"] * doc_length(i)) for i in range(20)]
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    cfg = _config(llama_dir, f"data.sources=[{{path: {corpus}}}]", "data.shuffle_buffer=1", "data.num_workers=0",
                  "data.validation_fraction=0")
    expected = [t for text in texts for t in tokenizer.encode(text).ids + [EOS_ID]]
    loader = build_dataloader(cfg.data, micro_batch_size=4, dp_rank=0, dp_size=1, seed=0)
    stream = []
    while len(stream) < len(expected):
        stream += next(loader).flatten().tolist()
    assert tokenizer.token_to_id("</s>") == EOS_ID
    assert stream[:len(expected)] == expected


@pytest.mark.parametrize("args,expected", [
    (["data.eod_token=<eos>"], "tokenizer lacks the special token(s) data.eod_token=<eos>; set each field to a token"),
    (["data.pad_token=<pad>"], "tokenizer lacks the special token(s) data.pad_token=<pad>; set each field to a token"),
    (["data.tokenizer={dir}/tokenizer.json"],
     "tokenizer lacks the special token(s) data.eod_token=<|endoftext|>, data.pad_token=<pad>; set each field"),
])
def test_a_token_the_tokenizer_lacks_is_one_line_naming_the_field(llama_dir, tmp_path, capsys, args, expected):
    """Checked as the config loads, before any rank starts. Naming the directory's tokenizer in data.tokenizer
    makes it the run's own, whose names are the run's (Parallax's by default)."""
    (tmp_path / "run.yaml").write_text(f"model:\n  init_from: {llama_dir}\ndata:\n  seq_len: 16\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(tmp_path / "run.yaml"), *[a.format(dir=llama_dir) for a in args]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("parallax: error: "), err
    assert expected in err, err


def test_export_writes_the_run_eos_and_pad(llama_dir, tmp_path, capsys):
    """Hugging Face -> a Parallax checkpoint of the run -> `parallax export`: the same weights, with `</s>`
    as eos and pad in both tokenizer_config.json and config.json."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from models.huggingface import import_directory

    overrides = [f"model.init_from={llama_dir}", "data.seq_len=16"]
    checkpoint = _write_checkpoint(tmp_path / "step-00000001", overrides,
                                   import_directory(llama_dir, load_config(None, overrides).model).state)
    main(["export", str(checkpoint), "--out", str(tmp_path / "back")])
    assert capsys.readouterr().out.startswith(f"parallax: wrote {tmp_path / 'back'}: Llama")

    theirs = AutoTokenizer.from_pretrained(tmp_path / "back")
    assert (theirs.eos_token, theirs.pad_token, theirs.eos_token_id) == ("</s>", "</s>", EOS_ID)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (EOS_ID, EOS_ID)
    assert config["eos_token_id"] == json.loads((llama_dir / "config.json").read_text())["eos_token_id"]
    before, after = load_file(llama_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(after[name], t) for name, t in before.items())


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON"),
    ('["</s>"]', "not a JSON object of tokenizer settings"),
])
def test_a_broken_tokenizer_config_is_one_line(llama_dir, tmp_path, content, expected):
    import shutil

    from launcher.config import ConfigError

    broken = tmp_path / "hf"
    shutil.copytree(llama_dir, broken)
    (broken / "tokenizer_config.json").write_text(content)
    with pytest.raises(ConfigError) as error:
        _config(broken)
    assert str(error.value).startswith(f"model.init_from: {broken / 'tokenizer_config.json'}: {expected}")
    assert "\n" not in str(error.value)
