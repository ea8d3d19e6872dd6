"""Issue 16, T5: `parallax export` writes a Hugging Face T5ForConditionalGeneration that computes
Parallax's logits, and a Hugging Face T5 comes into Parallax and back bit for bit. The checkpoint
scenarios are in tests/distributed/scenarios_export.py."""
import pytest
import torch

from launcher.cli import main
from models.huggingface import HuggingFaceError, export, import_directory, read_weights, t5
from tests.test_export import EXPORT_TOL, TEXTS, _write_checkpoint


@pytest.mark.parametrize("name,tied", [("export_t5_1_1_tp2_checkpoint", False), ("export_t5_dp2_zero3_checkpoint", True)])
def test_exported_t5_logits_equal_parallax_logits(scenario_results, name, tied):
    """T5.1.1 saved at TP=2 and T5 saved at ZeRO-3 DP=2, each on a span-corrupted batch; transformers
    computes the loss from the labels alone, shifting them right from the exported decoder start token."""
    result = scenario_results(name)
    assert result["hf_class"] == "T5ForConditionalGeneration"
    assert result["lm_head_tied"] == tied, "T5.1.1's output matrix loads as its own, T5's is the embedding"
    assert result["ours"].shape == result["hf"].shape == (4, 10, 512)
    torch.testing.assert_close(result["hf"], result["ours"], atol=EXPORT_TOL, rtol=0)
    assert result["ours_loss"] == pytest.approx(result["hf_loss"], abs=EXPORT_TOL)


def test_the_comparison_fails_for_swapped_keys_and_values(scenario_results):
    """The check has teeth: one cross-attention with its k and v exchanged is far from Parallax."""
    from transformers import AutoModelForSeq2SeqLM

    result = scenario_results("export_t5_1_1_tp2_checkpoint")
    model = AutoModelForSeq2SeqLM.from_pretrained(result["dir"]).eval()
    attn = model.decoder.block[0].layer[1].EncDecAttention
    attn.k.weight, attn.v.weight = attn.v.weight, attn.k.weight
    with torch.no_grad():
        wrong = model(input_ids=result["batch"]["input_ids"], labels=result["batch"]["labels"]).logits
    assert (wrong - result["ours"]).abs().max() > 100 * EXPORT_TOL


# --- Hugging Face -> Parallax -> Hugging Face ---------------------------------------------------------

SIZES = dict(d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=2,
             relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _random_t5(config, own_lm_head: bool):
    """A T5ForConditionalGeneration with every tensor random (norms included), and with an output
    matrix of its own if `own_lm_head` (transformers 5 builds every T5 with lm_head tied to shared)."""
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    if own_lm_head:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


# (feed_forward_proj, tie_word_embeddings, an lm_head.weight of its own in the file)
VARIANTS = {"T5": ("relu", True, False), "T5.1.1": ("gated-gelu", False, True),
            "T5.1.1 untrained, lm_head left tied by transformers": ("gated-gelu", False, False)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hugging_face_to_parallax_to_hugging_face_is_bitwise(tmp_path, variant):
    from transformers import T5Config

    feed_forward, tied, own_lm_head = VARIANTS[variant]
    config = T5Config(vocab_size=300, feed_forward_proj=feed_forward, tie_word_embeddings=tied, **SIZES)
    _random_t5(config, own_lm_head).save_pretrained(tmp_path / "hf")
    imported = import_directory(tmp_path / "hf")
    assert imported.twin is t5 and imported.vocab_size == 300
    assert (imported.model.feed_forward, imported.model.tied) == (feed_forward, tied)
    assert imported.state["embedding.weight"].shape == (384, 16) and not imported.state["embedding.weight"][300:].any()
    export(imported.state, imported.model, imported.vocab_size, None, tmp_path / "back")
    original, back = read_weights(tmp_path / "hf"), read_weights(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("feed_forward,tied,own_lm_head,expected", [
    ("gated-silu", False, False, "config.json: feed_forward_proj='gated-silu'; Parallax's T5 has 'relu' or 'gated-gelu'"),
    ("relu", True, True, "model.safetensors: lm_head.weight differs from shared.weight, but config.json's "
                         "tie_word_embeddings is true: Parallax's T5 scores a scaled output with its embedding"),
])
def test_a_t5_parallax_cannot_compute_is_refused_on_import(tmp_path, feed_forward, tied, own_lm_head, expected):
    from transformers import T5Config

    config = T5Config(vocab_size=300, feed_forward_proj=feed_forward, tie_word_embeddings=tied, **SIZES)
    _random_t5(config, own_lm_head).save_pretrained(tmp_path / "hf")
    with pytest.raises(HuggingFaceError) as error:
        import_directory(tmp_path / "hf")
    assert str(error.value) == expected


# --- the command --------------------------------------------------------------------------------------

TINY_T5 = ["model.arch=t5", "model.norm=rmsnorm", "model.num_layers=2", "model.num_decoder_layers=3",
           "model.hidden_size=16", "model.num_heads=2", "model.kv_channels=8", "model.ffn_hidden_size=24",
           "model.relative_attention_num_buckets=8", "model.relative_attention_max_distance=16"]
T5_1_1 = ["model.feed_forward=gated-gelu", "model.tie_embeddings=false"]


def test_export_command_writes_a_t5_that_transformers_loads(tmp_path, capsys):
    """A T5.1.1 checkpoint and Parallax's tokenizer (sentinels included) as a directory the Auto classes
    load: the same weights, the true vocabulary, pad and eos from the tokenizer, the decoder starting at pad."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from data_pipeline import prepare_tokenizer
    from launcher.config import load_config
    from models.huggingface import special_token_ids

    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS * 3))
    tokenizer_path = prepare_tokenizer([tmp_path / "corpus.txt"], tmp_path / "tokenizer.json", 400)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab = tokenizer.get_vocab_size()
    overrides = [*TINY_T5, *T5_1_1, f"data.tokenizer={tokenizer_path}"]
    cfg = load_config(None, overrides).model
    original = _random_t5(t5.hf_config(cfg, vocab, special_token_ids(tokenizer)), own_lm_head=True)
    state = t5.from_hf(original.state_dict(), cfg, cfg.padded_vocab_size(vocab))
    checkpoint = _write_checkpoint(tmp_path / "run" / "step-00000001", overrides, state)

    main(["export", str(checkpoint), "--out", str(tmp_path / "hf")])
    assert capsys.readouterr().out.startswith(f"parallax: wrote {tmp_path / 'hf'}: T5 (fp32, vocabulary {vocab})")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "T5ForConditionalGeneration" and model.config.vocab_size == vocab
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<|endoftext|>")
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (pad, eos, pad)
    loaded, expected = model.state_dict(), original.state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    text = "first document<|endoftext|>second <extra_id_0> document<pad>"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == tokenizer.encode(text).ids


def test_switch_t5_export_is_refused_in_one_line(tmp_path, capsys):
    checkpoint = _write_checkpoint(tmp_path / "step-00000001", [*TINY_T5, *T5_1_1, "model.moe={num_experts: 2}"])
    with pytest.raises(SystemExit) as exit:
        main(["export", str(checkpoint), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err == (
        f"parallax: error: cannot export {checkpoint}: no exact Hugging Face twin (closest: T5): model.moe is set: "
        "Switch-T5 has no exact twin, T5ForConditionalGeneration's feed-forwards are dense\n")
    assert not (tmp_path / "hf").exists()
