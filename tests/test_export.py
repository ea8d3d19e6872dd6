"""Issue 16: `parallax export` writes a Hugging Face GPT-2 or Llama that computes Parallax's logits,
and transformers' models are the outside check of the GPT's math, both ways. The checkpoint
scenarios are in tests/distributed/scenarios_export.py."""
import json
import zlib
from pathlib import Path

import pytest
import torch

from launcher.cli import main
from models.huggingface import gpt2
from models.huggingface.tokenizer import write_tokenizer

EXPORT_TOL = 1e-5


@pytest.mark.parametrize("name,hf_class", [
    ("export_tp2_checkpoint", "GPT2LMHeadModel"),
    ("export_dp2_zero3_checkpoint", "GPT2LMHeadModel"),
    ("export_llama_style_tp2_checkpoint", "LlamaForCausalLM"),
    ("export_llama_style_dp2_zero3_checkpoint", "LlamaForCausalLM"),
])
def test_exported_logits_equal_parallax_logits(scenario_results, name, hf_class):
    result = scenario_results(name)
    assert result["hf_class"] == hf_class
    assert result["ours"].shape == result["hf"].shape == (3, 32, 512)
    torch.testing.assert_close(result["hf"], result["ours"], atol=EXPORT_TOL, rtol=0)
    # The training objective too: Parallax's loss of a window is GPT-2's next-token loss, not the current token's.
    assert result["ours_loss"] == pytest.approx(result["hf_loss"], abs=EXPORT_TOL)


def _c_attn_variants(weight: torch.Tensor, bias: torch.Tensor, num_heads: int):
    """Two wrong mappings of the same QKV: q and k swapped, and Parallax's head-by-head rows left as they are."""
    q, k, v = weight.chunk(3, dim=1)
    qb, kb, vb = bias.chunk(3)
    swapped = (torch.cat([k, q, v], dim=1), torch.cat([kb, qb, vb]))
    # Undo the regrouping: GPT-2 then reads [q_0, k_0, v_0, q_1, ...] as if it were [q | k | v].
    heads = lambda t: t.reshape(*t.shape[:-1], 3, num_heads, -1).transpose(-3, -2).reshape(t.shape)  # noqa: E731
    return {"q and k swapped": swapped, "heads not regrouped": (heads(weight), heads(bias))}


def test_the_comparison_fails_for_a_wrong_qkv_mapping(scenario_results):
    """The check has teeth: the exported model with its attention weights mapped wrongly is far from Parallax."""
    from transformers import AutoModelForCausalLM

    result = scenario_results("export_tp2_checkpoint")
    for what in ("q and k swapped", "heads not regrouped"):
        model = AutoModelForCausalLM.from_pretrained(result["dir"]).eval()
        attn = model.transformer.h[0].attn.c_attn
        weight, bias = _c_attn_variants(attn.weight.data, attn.bias.data, model.config.n_head)[what]
        attn.weight.data.copy_(weight)
        attn.bias.data.copy_(bias)
        with torch.no_grad():
            wrong = model(result["tokens"]).logits
        assert (wrong - result["ours"]).abs().max() > 100 * EXPORT_TOL, what


def test_the_comparison_fails_for_a_wrong_rotary_layout(scenario_results):
    """Llama's q and k rows must be permuted from Parallax's neighbouring rotary pairs to transformers'
    halves: left as they are, the exported model is far from Parallax."""
    from transformers import AutoModelForCausalLM

    result = scenario_results("export_llama_style_tp2_checkpoint")
    model = AutoModelForCausalLM.from_pretrained(result["dir"]).eval()
    head_dim = model.config.head_dim
    for layer in model.model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            w = projection.weight.data
            w.copy_(w.reshape(-1, 2, head_dim // 2, w.shape[1]).transpose(1, 2).reshape(w.shape))
    with torch.no_grad():
        wrong = model(result["tokens"]).logits
    assert (wrong - result["ours"]).abs().max() > 100 * EXPORT_TOL


def test_imported_llama_computes_transformers_logits(scenario_results):
    """The other direction: a random LlamaForCausalLM (grouped-query, untied, rope_theta 500000) read
    by `import_directory` into Parallax's GPT scores a batch as transformers does."""
    result = scenario_results("imported_llama_logits")
    torch.testing.assert_close(result["ours"], result["hf"], atol=EXPORT_TOL, rtol=0)


LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")  # Llama 2's first ids; it has no pad token


def random_hf_model(kind: str, directory: Path, vocab_size: int = 400, llama_tokens: bool = False) -> Path:
    """A small random transformers model saved with save_pretrained, and the id tokenizer, in `directory`:
    with Parallax's special tokens, or with `llama_tokens` with none of them but Llama 2's, saved by
    transformers itself as a Llama directory's are (eos </s>, bos <s>, no pad)."""
    from tokenizers import Tokenizer
    from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    from tests.data.corpora import write_id_tokenizer

    configs = {
        "gpt2": GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                           activation_function="gelu_new"),
        "llama": LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
        "llama-tied": LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                  tie_word_embeddings=True),
    }
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[kind])
    for p in model.parameters():  # every tensor random (norms start at 1, biases at 0), logits of order 1:
        p.data.normal_(std=0.1)   # a wrong mapping of any of them is far from the tolerance
    model.save_pretrained(directory)
    if llama_tokens:
        tokenizer = Tokenizer.from_file(str(write_id_tokenizer(directory / "id-tokenizer.json", vocab_size - 3,
                                                               LLAMA_SPECIALS)))
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(directory)
    else:
        write_tokenizer(Tokenizer.from_file(str(write_id_tokenizer(directory / "id-tokenizer.json", vocab_size - 3))),
                        directory)
    return directory


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-tied"])
def test_hugging_face_to_parallax_to_hugging_face_is_bitwise(tmp_path, kind):
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from models.huggingface import export, import_directory

    original = random_hf_model(kind, tmp_path / "original")
    imported = import_directory(original)
    assert imported.tokenizer_path == original / "tokenizer.json"
    export(imported.state, imported.model, imported.vocab_size, Tokenizer.from_file(str(imported.tokenizer_path)),
           tmp_path / "again")
    before, after = load_file(original / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    config = lambda d: {k: v for k, v in json.loads((d / "config.json").read_text()).items()  # noqa: E731
                        if k not in ("transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "dtype")}
    assert config(tmp_path / "again") == config(original)


# --- the command, on small checkpoints written here in Parallax's format -----------------------------

def _write_checkpoint(path: Path, overrides: list[str], state: dict | None = None) -> Path:
    """A committed Parallax checkpoint: one TP=1 shard holding `state` (if any) with its block checksums,
    config.yaml and the manifest, with the shard's index checksum."""
    from launcher.config import load_config
    from parallel.checkpoint import checksums
    from parallel.checkpoint.layout_free import FORMAT_VERSION

    path.mkdir(parents=True)
    files = {"config.yaml": load_config(None, overrides).to_yaml().encode()}
    if state is not None:
        pieces = {name: {"tp_rank": 0, "tp_size": 1, "dim": 0, "shape": list(t.shape), "start": 0, "param": t.flatten(),
                         "exp_avg": torch.zeros(t.numel()), "exp_avg_sq": torch.zeros(t.numel())}
                  for name, t in state.items()}
        checksums.add_block_checksums(pieces, 1 << 20)
        shard = {"pieces": pieces, "rng": None}
        torch.save(shard, path / "shard-00000.pt")
        files["shard-00000.pt"] = (path / "shard-00000.pt").read_bytes()
    (path / "config.yaml").write_bytes(files["config.yaml"])
    manifest = {"version": FORMAT_VERSION, "step": 1, "tokens": 0, "layout": {}, "files": {
        name: {"size": len(data), "crc32": zlib.crc32(data)} for name, data in files.items()}}
    if state is not None:
        manifest["files"]["shard-00000.pt"]["index_crc32"] = checksums.index_checksum(shard)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.max_seq_len=16", "data.seq_len=16"]


def _random_gpt_state(vocab_padded: int) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"embedding.weight": (vocab_padded, 32), "position_embedding.weight": (16, 32),
              "final_norm.weight": (32,), "final_norm.bias": (32,)}
    for i in range(2):
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in {
            "attn_norm.weight": (32,), "attn_norm.bias": (32,), "attn.qkv.weight": (96, 32), "attn.qkv.bias": (96,),
            "attn.proj.weight": (32, 32), "attn.proj.bias": (32,), "mlp_norm.weight": (32,), "mlp_norm.bias": (32,),
            "mlp.fc_in.weight": (128, 32), "mlp.fc_in.bias": (128,), "mlp.fc_out.weight": (32, 128),
            "mlp.fc_out.bias": (32,)}.items()}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_command_writes_the_true_vocabulary_and_every_weight(tmp_path, capsys, dtype):
    """A 400-token tokenizer padded to 512 rows: GPT-2 gets the 400 real rows, and mapping its weights back
    gives the checkpoint's (in bf16, to bf16's precision)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.data.corpora import write_id_tokenizer

    tokenizer_path = write_id_tokenizer(tmp_path / "tokenizer.json", 397)
    state = _random_gpt_state(512)
    run = tmp_path / "run"
    _write_checkpoint(run / "checkpoints" / "step-00000001", [*TINY, f"data.tokenizer={tokenizer_path}"], state)
    (run / "checkpoints" / "latest").write_text("step-00000001")
    main(["export", str(run), "--out", str(tmp_path / "hf"), "--dtype", dtype])
    assert capsys.readouterr().out.startswith(f"parallax: wrote {tmp_path / 'hf'}: GPT-2 ({dtype}, vocabulary 400)")

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.vocab_size == 400
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "the output layer stays tied"
    back = gpt2.from_hf({k: v.float() for k, v in model.state_dict().items()}, model_cfg(), 512)
    state["embedding.weight"][400:] = 0  # the padding rows are not exported
    tol = 0 if dtype == "fp32" else 1e-2
    for name, tensor in state.items():
        torch.testing.assert_close(back[name], tensor, atol=tol, rtol=tol, msg=name)
    ids = Tokenizer.from_file(str(tokenizer_path)).encode("d5 d17 <|endoftext|> d396").ids
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("d5 d17 <|endoftext|> d396") == ids


def model_cfg():
    from launcher.config import load_config

    return load_config(None, TINY).model


@pytest.mark.parametrize("overrides,expected", [
    (["model.position_embedding=rotary"], "model.position_embedding=rotary: GPT-2 has learned positions"),
    (["model.norm=rmsnorm"], "model.norm=rmsnorm: GPT-2 normalises with LayerNorm"),
    (["model.moe={num_experts: 2}"], "model.moe is set: GPT-2 has a dense MLP in every block"),
    (["model.position_embedding=rotary", "model.norm=rmsnorm", "model.linear_bias=false"],
     "model.mlp=gelu: Llama's MLP is SwiGLU"),
])
def test_unmappable_models_are_refused_in_one_line(tmp_path, capsys, overrides, expected):
    checkpoint = _write_checkpoint(tmp_path / "step-00000001", [*TINY, *overrides])
    with pytest.raises(SystemExit) as exit:
        main(["export", str(checkpoint), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    closest = "Llama" if "Llama" in expected else "GPT-2"
    assert err == f"parallax: error: cannot export {checkpoint}: no exact Hugging Face twin (closest: {closest}): {expected}\n"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args,expected", [
    (["missing-run"], "no complete checkpoint under missing-run"),
    (["CHECKPOINT", "--dtype", "fp16"], "--dtype fp16 is not supported; choose fp32 or bf16"),
    (["CHECKPOINT", "--dtype", "int8"], "--dtype int8 is not supported; choose fp32 or bf16"),
    (["CHECKPOINT"], "does not match its checksum"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    checkpoint = _write_checkpoint(tmp_path / "step-00000001", TINY)
    (checkpoint / "config.yaml").write_text((checkpoint / "config.yaml").read_text().replace("arch: gpt", "arch: t5 "))  # same size, other bytes
    args = [str(checkpoint) if a == "CHECKPOINT" else a for a in args]
    with pytest.raises(SystemExit) as exit:
        main(["export", *args, "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and expected in err, err


# --- the tokenizer ------------------------------------------------------------------------------------

TEXTS = [
    "def f(x):\n    return x ** 2  # squares\n\n\tprint(f(3))\n",
    "naïve café — 日本語のテキスト, emoji 🎉 and ‘quotes’",
    "first document<|endoftext|>second  document with  double spaces<pad> <extra_id_0>",
]


def test_hugging_face_tokenizer_encodes_and_decodes_as_parallax(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from data_pipeline import prepare_tokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(TEXTS * 3) + open(__file__).read())
    ours = Tokenizer.from_file(str(prepare_tokenizer([tmp_path / "corpus.txt"], tmp_path / "tok.json", 600)))
    write_tokenizer(ours, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.token_to_id("<|endoftext|>")
    assert theirs.pad_token_id == ours.token_to_id("<pad>")
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False) == text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert theirs.encode("<|endoftext|>") == [ours.token_to_id("<|endoftext|>")]
