"""Issue 16 point 5: `parallax generate` samples what transformers' `generate` samples on the model
`parallax export` writes, from a checkpoint or a Hugging Face directory (GPT-2 and T5), and refuses bad
input in one line."""
import logging

import pytest
import torch

from launcher.cli import main
from tests.data.corpora import write_id_tokenizer
from tests.distributed.scenarios_init_from import PAD, write_t5_directory
from tests.test_export import TINY, _random_gpt_state, _write_checkpoint

PROMPT = "d5 d17 d3 d250 d8"  # one token per word (write_id_tokenizer), so text and tokens convert both ways
NEW_TOKENS = 24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where `parallax generate` runs the model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run with one checkpoint of a random 2-layer GPT (context 32) and a 400-token tokenizer padded to 512."""
    tmp = tmp_path_factory.mktemp("generate")
    tokenizer = write_id_tokenizer(tmp / "tokenizer.json", 397)
    run = tmp / "run"
    state = _random_gpt_state(512)
    state["position_embedding.weight"] = torch.randn(32, 32, generator=torch.Generator().manual_seed(1))
    overrides = [*TINY, "model.max_seq_len=32", f"data.tokenizer={tokenizer}"]
    _write_checkpoint(run / "checkpoints" / "step-00000001", overrides, state)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    return run


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT2LMHeadModel as transformers saves it, with a Parallax tokenizer."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from models.huggingface.tokenizer import write_tokenizer

    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(2)  # its greedy text has no end-of-text token in 24, and 21 different tokens
    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=0,
                               bos_token_id=0, pad_token_id=1, initializer_range=0.5)).save_pretrained(tmp / "hf")
    write_tokenizer(Tokenizer.from_file(str(write_id_tokenizer(tmp / "tokenizer.json", 397))), tmp / "hf")
    return tmp / "hf"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A random T5.1.1 as transformers saves it, with a Parallax tokenizer (200 tokens, no sentinels)."""
    return write_t5_directory(tmp_path_factory.mktemp("t5") / "hf")


@pytest.fixture(scope="module")
def t5_checkpoint(tmp_path_factory, t5_dir):
    """A run whose checkpoint holds the same T5.1.1, as model.init_from imports it."""
    from models.huggingface import import_directory

    run = tmp_path_factory.mktemp("t5-run")
    _write_checkpoint(run / "checkpoints" / "step-00000001", [f"model.init_from={t5_dir}"],
                      import_directory(t5_dir).state)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    return run


def generate(capsys, path, *flags) -> str:
    """What the command prints on stdout; it prints nothing on stderr (transformers' progress bars included)."""
    capsys.readouterr()
    main(["generate", str(path), "--prompt", PROMPT, *flags])
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    return captured.out


def transformers_greedy(directory, max_new_tokens: int) -> list[int]:
    """What transformers alone generates greedily on `directory`: the prompt's ids and the new ones (an
    encoder-decoder's: the decoder start and the new ones)."""
    import transformers
    from transformers import AutoTokenizer

    from models.huggingface import read_config

    model = getattr(transformers, read_config(directory)[0].AUTO_CLASS).from_pretrained(directory).to(DEVICE)
    inputs = AutoTokenizer.from_pretrained(directory)(PROMPT, return_tensors="pt").to(DEVICE)
    return model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)[0].tolist()


def tokens(directory, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory).encode(text)


def test_greedy_from_a_checkpoint_is_what_transformers_generates_on_the_export(tmp_path, capsys, checkpoint):
    main(["export", str(checkpoint), "--out", str(tmp_path / "hf")])
    expected = transformers_greedy(tmp_path / "hf", NEW_TOKENS)
    assert len(expected) == len(PROMPT.split()) + NEW_TOKENS, "the end-of-text token came early: compare more tokens"
    assert len(set(expected[-NEW_TOKENS:])) >= 5, "one token repeated would compare little"
    out = generate(capsys, checkpoint, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))
    assert out.startswith(PROMPT + " ") and out.endswith("\n")
    assert tokens(tmp_path / "hf", out) == expected


def test_greedy_from_a_hugging_face_directory_is_what_transformers_generates(capsys, hf_dir):
    expected = transformers_greedy(hf_dir, NEW_TOKENS)
    assert len(expected) == len(PROMPT.split()) + NEW_TOKENS and len(set(expected[-NEW_TOKENS:])) >= 5
    out = generate(capsys, hf_dir, "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))
    assert tokens(hf_dir, out) == expected


@pytest.mark.parametrize("source", ["t5_dir", "t5_checkpoint"])
def test_greedy_t5_is_what_transformers_generates(request, capsys, caplog, t5_dir, source):
    """An encoder-decoder reads the prompt as its encoder input and prints its decoder's output alone:
    transformers' tokens after the decoder start (<pad>). Loading a T5.1.1, transformers warns that its
    output matrix is not tied (which is right); the command's stderr is for errors only."""
    start, *new = transformers_greedy(t5_dir, NEW_TOKENS)
    assert start == PAD and len(new) == NEW_TOKENS, "the end-of-text token came early: compare more tokens"
    assert len(set(new)) >= 5, "one token repeated would compare little"
    caplog.clear()
    out = generate(capsys, request.getfixturevalue(source), "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))
    assert tokens(t5_dir, out) == new
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_sampling_repeats_with_its_seed_and_differs_across_seeds(capsys, checkpoint):
    first, again, other = (generate(capsys, checkpoint, "--seed", seed, "--max-new-tokens", "20")
                           for seed in ("1", "1", "2"))
    assert first == again != other
    assert len(first.split()) == len(PROMPT.split()) + 20


@pytest.mark.parametrize("flags", [["--top-k", "1"], ["--top-p", "1e-6"]])
def test_top_k_and_top_p_reach_the_sampler(capsys, checkpoint, flags):
    """Keeping only the most likely token makes sampling greedy, at any temperature."""
    greedy = generate(capsys, checkpoint, "--temperature", "0", "--max-new-tokens", "20")
    assert generate(capsys, checkpoint, "--temperature", "5", *flags, "--max-new-tokens", "20") == greedy


@pytest.mark.parametrize("flags,expected", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: generate at least 1 token"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be 0 (greedy) or more"),
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]; 1 keeps every token"),
    (["--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]; 1 keeps every token"),
    (["--top-k", "-1"], "--top-k -1: must be 0 (every token) or more"),
    (["--prompt", ""], "--prompt is empty; give the text to continue"),
    (["--max-new-tokens", "28"], "--prompt is 5 tokens and --max-new-tokens 28: 33 exceed the model's context of "
                                 "32 (model.max_seq_len); shorten one"),
])
def test_bad_flags_give_one_line(capsys, checkpoint, flags, expected):
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(checkpoint), "--prompt", PROMPT, *flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"parallax: error: {expected}\n"


def _hf_dir_with(tmp_path, hf_dir, files):
    """A copy of `hf_dir` that has only `files`: what an interrupted copy leaves."""
    (tmp_path / "partial").mkdir()
    for name in files:
        (tmp_path / "partial" / name).write_bytes((hf_dir / name).read_bytes())
    return tmp_path / "partial"


def _quantized(tmp_path, hf_dir):
    """A copy of `hf_dir` whose model.safetensors holds int8 weights, as a quantized checkpoint would."""
    from safetensors.torch import load_file, save_file

    copy = _hf_dir_with(tmp_path, hf_dir, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    weights = load_file(hf_dir / "model.safetensors")
    save_file({name: t.to(torch.int8) for name, t in weights.items()}, copy / "model.safetensors")
    return copy


@pytest.mark.parametrize("make,flags,expected", [
    (lambda tmp, hf: tmp / "missing", [], "{path}: no such file or directory"),
    (lambda tmp, hf: tmp, [], "{path}: neither a Parallax run or checkpoint (no checkpoints/, step-*/ or manifest.json) "
                              "nor a Hugging Face model directory (no config.json)"),
    (lambda tmp, hf: _hf_dir_with(tmp, hf, ["config.json"]), [],
     "{path}: no model.safetensors (nor its index); save the model with save_pretrained(safe_serialization=True)"),
    (lambda tmp, hf: _hf_dir_with(tmp, hf, ["config.json", "model.safetensors"]), [],
     "{path}/tokenizer.json: not found; generate needs the model's tokenizer (`parallax export` writes it)"),
    (lambda tmp, hf: hf, ["--step", "3"], "--step 3: {path} is a Hugging Face model directory, which holds one model"),
    (_quantized, [], "{path}/model.safetensors: transformer.h.0.attn.c_attn.bias is int8, not floating point (a "
                     "quantized checkpoint?); Parallax reads only a model's floating-point weights"),
])
def test_bad_paths_give_one_line(tmp_path, capsys, hf_dir, make, flags, expected):
    (tmp_path / "notes.txt").write_text("not a model")
    path = make(tmp_path, hf_dir)
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(path), "--prompt", PROMPT, *flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"parallax: error: {expected.format(path=path)}\n"
