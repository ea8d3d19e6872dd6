"""Issue 27 point 5: `parallax export` writes a BERT run as BertForMaskedLM, RobertaForMaskedLM or
MegatronBertForMaskedLM, whose logits are Parallax's, with a tokenizer transformers' fill-mask pipeline
uses; `model.init_from` takes a BERT or RoBERTa directory (its mask token too), and the trip Hugging Face ->
Parallax -> Hugging Face through the command is bitwise. One process, TP=1, checkpoints written here in
Parallax's format; the layouts are the distributed scenarios'."""
import json
from pathlib import Path

import pytest
import torch

from data_pipeline.config import EOD, MASK, PAD
from launcher.cli import main
from tests.data.corpora import write_id_tokenizer
from tests.test_export import _write_checkpoint

TOL = 1e-5
IDS = 397  # d0..d396 after the specials: 401 tokens, padded to 512 rows
SPECIALS = (EOD, PAD, "<unk>", MASK)  # <pad> is id 1, where RoBERTa's positions need it
TINY = ["model.arch=bert", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
        "model.ffn_hidden_size=48", "model.max_seq_len=16", "data.seq_len=16"]
FAMILY = {  # twin: (transformers class, overrides)
    "BERT": ("BertForMaskedLM", ["model.norm_eps=1e-12"]),
    "RoBERTa": ("RobertaForMaskedLM", ["model.position_offset=2", "model.type_vocab_size=1"]),
    "Megatron-BERT": ("MegatronBertForMaskedLM", ["model.norm_placement=pre", "model.norm_eps=1e-12"]),
}


def _bert_run(tmp_path: Path, overrides: list[str], specials=SPECIALS):
    """A run directory whose newest checkpoint holds a random BERT (norms and biases nudged off their initial
    values, so a mapping that dropped one would show), and that BERT's logits of `tokens`, true vocabulary."""
    from launcher.config import load_config
    from models.bert import BERT
    from parallel.topology import single_process_world

    tokenizer = write_id_tokenizer(tmp_path / "tokenizer.json", IDS, specials)
    overrides = [*TINY, *overrides, f"data.tokenizer={tokenizer}"]
    cfg = load_config(None, overrides)
    vocab = IDS + len(specials)
    tokens = torch.randint(len(specials), vocab, (3, 16), generator=torch.Generator().manual_seed(1))
    with single_process_world():
        torch.manual_seed(5)
        model = BERT(cfg.model, vocab).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
            ours = model(tokens).transpose(0, 1)[..., :vocab]
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoints" / "step-00000001", overrides, state)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    return run, tokens, ours


@pytest.mark.parametrize("name", FAMILY)
def test_exported_encoder_computes_parallax_logits_and_fills_masks(tmp_path, capsys, name):
    from transformers import AutoModelForMaskedLM, pipeline

    hf_class, overrides = FAMILY[name]
    run, tokens, ours = _bert_run(tmp_path, overrides)
    main(["export", str(run), "--out", str(tmp_path / "hf")])
    assert f"parallax: wrote {tmp_path / 'hf'}: {name} (fp32, vocabulary 401)" in capsys.readouterr().out

    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == hf_class and model.config.vocab_size == 401
    with torch.no_grad():
        theirs = model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    assert (ours - ours.mean()).abs().max() > 100 * TOL  # logits that differ from one another

    fill = pipeline("fill-mask", model=str(tmp_path / "hf"), top_k=3)
    assert fill.tokenizer.mask_token == MASK and fill.tokenizer.mask_token_id == SPECIALS.index(MASK)
    filled = fill("d5 d17 <mask> d42")
    masked = torch.tensor([[5 + 4, 17 + 4, 3, 42 + 4]])
    with torch.no_grad():
        expected = model(input_ids=masked).logits[0, 2].softmax(-1).topk(3)
    assert [f["token"] for f in filled] == expected.indices.tolist()


@pytest.mark.parametrize("name", ["bert_export_tp2_sp_checkpoint", "bert_export_dp2_zero3_checkpoint"])
def test_checkpoints_saved_at_tp2_and_at_zero3_export_to_parallax_logits(scenario_results, name):
    """Trained checkpoints of the layout scenarios (TP=2 with SP, ZeRO-3 DP=2), exported as BertForMaskedLM."""
    result = scenario_results(name)
    assert result["hf_class"] == "BertForMaskedLM"
    assert result["ours"].shape == result["hf"].shape == (4, 32, 512)
    torch.testing.assert_close(result["hf"], result["ours"], atol=TOL, rtol=0)
    assert (result["ours"] - result["ours"].mean()).abs().max() > 100 * TOL


def test_roberta_export_needs_the_padding_id_before_its_first_position(tmp_path, capsys):
    """RoBERTa numbers positions from its padding id + 1: a tokenizer whose <pad> is id 0 cannot be exported
    with model.position_offset=2."""
    run, _, _ = _bert_run(tmp_path, FAMILY["RoBERTa"][1], specials=(PAD, EOD, "<unk>", MASK))
    with pytest.raises(SystemExit) as exit:
        main(["export", str(run), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert "the tokenizer's padding token (data.pad_token) is id 0; use a tokenizer whose padding id is 1" in err


def _hf_directory(directory: Path, kind: str, mask: str = MASK, **config_fields) -> Path:
    """A random BertForMaskedLM / RobertaForMaskedLM saved by transformers, every tensor drawn (norms and
    biases too), with an id tokenizer whose mask token is `mask`, declared in tokenizer_config.json;
    `config_fields` go to its config."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    shapes = dict(vocab_size=IDS + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, **config_fields)
    config = (transformers.BertConfig(max_position_embeddings=16, pad_token_id=1, **shapes) if kind == "bert" else
              transformers.RobertaConfig(max_position_embeddings=18, type_vocab_size=1, pad_token_id=1,
                                         layer_norm_eps=1e-5, **shapes))
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(config)
    for p in model.parameters():
        p.data.normal_(std=0.1)
    model.save_pretrained(directory)
    tokenizer = Tokenizer.from_file(str(write_id_tokenizer(directory / "id-tokenizer.json", IDS,
                                                           (EOD, PAD, "<unk>", mask))))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOD, pad_token=PAD, unk_token="<unk>",
                            mask_token=mask).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hugging_face_to_parallax_to_hugging_face_through_init_from_and_export_is_bitwise(tmp_path, capsys, kind):
    """model.init_from reads the directory (model, weights, tokenizer and its mask token, here [MASK]); the
    checkpoint of those weights, exported by the command, is the directory again, tensor for tensor."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from launcher.config import load_config
    from models.huggingface import import_directory

    original = _hf_directory(tmp_path / "original", kind, mask="[MASK]")
    overrides = [f"model.init_from={original}", "data.seq_len=16"]
    cfg = load_config(None, overrides)
    assert cfg.model.arch == "bert" and cfg.model.position_offset == (2 if kind == "roberta" else 0)
    assert cfg.data.masked_lm.mask_token == "[MASK]" and cfg.data.eod_token == EOD and cfg.data.pad_token == PAD
    imported = import_directory(original, cfg.model)
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoints" / "step-00000001", overrides, imported.state)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    main(["export", str(run), "--out", str(tmp_path / "again")])
    assert "RoBERTa" in capsys.readouterr().out if kind == "roberta" else True

    before, after = load_file(original / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    ignored = ("transformers_version", "bos_token_id", "eos_token_id", "dtype")
    config = lambda d: {k: v for k, v in json.loads((d / "config.json").read_text()).items()  # noqa: E731
                        if k not in ignored}
    assert config(tmp_path / "again") == config(original)
    assert AutoTokenizer.from_pretrained(tmp_path / "again").mask_token == "[MASK]"


def test_init_from_an_encoder_directory_refuses_a_mask_token_its_tokenizer_lacks(tmp_path, capsys):
    """The run's data.masked_lm.mask_token must be a token of the directory's tokenizer: one line, exit 2,
    before any rank starts (here `parallax plan`, which reads the config as `train` does)."""
    original = _hf_directory(tmp_path / "original", "bert")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  init_from: {original}\ndata:\n  seq_len: 16\n  masked_lm:\n    mask_token: '[MASK]'\n")
    capsys.readouterr()  # transformers' progress bar while saving the directory
    with pytest.raises(SystemExit) as exit:
        main(["plan", str(config), "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a100"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert "has no mask token [MASK] (data.masked_lm.mask_token)" in err
