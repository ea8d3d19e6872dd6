"""Issue 6: T5 equals Hugging Face's, every layout equals one process, span corruption is T5's, and
the t5-tiny config learns. The model scenarios are in tests/distributed/scenarios_t5.py."""
import numpy
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline import EOD, PAD, DataConfig, build_dataloader
from data_pipeline.span_corruption import IGNORE_INDEX, SpanCorruption
from launcher.cli import main
from tests.data.corpora import write_id_corpus
from tests.data.test_resume import through_a_checkpoint_file
from tests.distributed.scenarios_t5 import GLOBAL_BATCH
from tests.test_moe import MOE_TOL
from tests.test_parity import assert_model_matches, assert_training_matches

HF_TOL = 1e-4


@pytest.mark.parametrize("variant", ["t5_hugging_face_parity", "t5_1_1_hugging_face_parity"])
def test_logits_and_loss_equal_hugging_face_t5(scenario_results, variant):
    """The same random weights in transformers' T5ForConditionalGeneration and ours: relative bias
    buckets, RMSNorm, unscaled scores, output scaling (T5) or untied head (T5.1.1), ignored labels."""
    result = scenario_results(variant)
    assert result["ours_logits"].shape == result["hf_logits"].shape == (3, 20, 512)
    torch.testing.assert_close(result["ours_logits"], result["hf_logits"], atol=HF_TOL, rtol=0)
    assert result["ours_loss"] == pytest.approx(result["hf_loss"], abs=HF_TOL)


@pytest.mark.parametrize("layout,reference", [
    ("t5_tp2_model", "t5_reference_model"),
    ("t5_1_1_tp2_model", "t5_1_1_reference_model"),
])
def test_tensor_parallel_logits_loss_and_gradients_match_one_process(scenario_results, layout, reference):
    reference = scenario_results(reference)
    assert "encoder.relative_bias.weight" in reference["grads"] and "decoder.blocks.2.cross_attn.kv.weight" in reference["grads"]
    assert_model_matches(reference, scenario_results(layout))


def test_every_attention_mask_is_contiguous_in_its_last_dimension(scenario_results):
    """A GPU's fused SDPA kernels (flash, memory-efficient, cuDNN) refuse a mask whose last dimension is
    strided and torch falls back to the math kernel, which materialises every score. The encoder's relative
    bias, a gather permuted to [heads, q, k], had stride 4 there: on an H200, 'No available kernel' when
    SDPA was held to the memory-efficient one (bench/gpu/smoke.py)."""
    last_strides = scenario_results("t5_attention_masks")
    assert len(last_strides) == 2 + 3 and set(last_strides) == {1}, last_strides  # self-attention masks


@pytest.mark.parametrize("layout", ["t5_tp2_activation_checkpointing_training", "t5_dp2_zero3_training"])
def test_three_steps_match_one_process(scenario_results, layout):
    reference = scenario_results("t5_reference_training")
    assert len(reference) == 3 and reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    assert_training_matches(reference, scenario_results(layout))


def test_switch_t5_trains_and_reports_each_expert_layer(scenario_results):
    """Every other feed-forward is a layer of experts: encoder layer 1 and decoder layer 1, numbered 1 and 3
    through the encoder's 2 layers, then the decoder's."""
    history = scenario_results("switch_t5_training")
    assert history[-1]["loss"] < history[0]["loss"]
    assert [layer["layer"] for layer in history[0]["moe"]] == [1, 3]
    routed = sum(history[0]["moe"][0]["tokens_per_expert"])
    assert routed == GLOBAL_BATCH * 40, "top-1: every encoder token goes to one expert"


def test_switch_t5_at_ep2_matches_one_process_over_three_steps(scenario_results):
    """The two EP ranks hold two experts each and exchange tokens all-to-all in both stacks."""
    reference = scenario_results("switch_t5_reference_training")
    assert reference[-1]["loss"] < reference[0]["loss"], "the reference itself must learn"
    assert_training_matches(reference, scenario_results("switch_t5_ep2_training"), tol=MOE_TOL)


def test_t5_tiny_config_trains_on_cpu_and_its_loss_falls(scenario_results):
    history = scenario_results("t5_tiny_training")
    losses = [record["loss"] for record in history if "loss" in record]  # not its evaluations
    assert len(losses) == 30
    assert numpy.mean(losses[-5:]) < 0.75 * losses[0], losses


def test_t5_resumes_exactly_from_its_checkpoint(scenario_results):
    straight, resumed = scenario_results("t5_exact_resume")
    assert len(straight) == 4 and len(resumed) == 2, "the resumed run trains steps 3 and 4 only"
    assert resumed == straight[2:]


# --- span corruption ------------------------------------------------------------------------------

SENTINELS = tuple(range(32099, 31999, -1))  # T5's vocabulary: <extra_id_0> is id 32099


def corruption(inputs_length: int, seed: int = 0) -> SpanCorruption:
    return SpanCorruption(inputs_length=inputs_length, noise_density=0.15, mean_noise_span_length=3.0,
                          sentinels=SENTINELS, eod=1, pad=0, seed=seed)


def uncorrupt(example: dict) -> tuple[numpy.ndarray, list[int]]:
    """The window back from input and target, by putting each sentinel's span where the sentinel
    stands in the input; also the spans' lengths. Fails unless every span follows its sentinel in order."""
    inputs, labels = example["input_ids"][:-1].tolist(), example["labels"][:-1].tolist()
    assert example["input_ids"][-1] == example["labels"][-1] == 1, "both end with end-of-document"
    used = [t for t in inputs if t in SENTINELS]
    assert used == list(SENTINELS[:len(used)]), "sentinels are <extra_id_0>, <extra_id_1>, ... in order"
    assert [t for t in labels if t in SENTINELS] == used, "the target has the input's sentinels in the same order"
    spans, window = {}, []
    for token in labels:
        if token in SENTINELS:
            current = spans[token] = []
        else:
            current.append(token)
    for token in inputs:
        window.extend(spans[token] if token in SENTINELS else [token])
    return numpy.array(window), [len(spans[s]) for s in used]


def test_noise_fraction_and_mean_span_length_within_5_percent_of_the_targets():
    objective, rng = corruption(512), numpy.random.default_rng(0)
    noise = total = 0
    span_lengths = []
    for _ in range(1000):
        window = rng.integers(2, 32000, objective.raw_length)
        restored, lengths = uncorrupt(objective(window))
        numpy.testing.assert_array_equal(restored, window)
        noise, total, span_lengths = noise + sum(lengths), total + len(window), span_lengths + lengths
    assert noise / total == pytest.approx(0.15, rel=0.05)
    assert numpy.mean(span_lengths) == pytest.approx(3.0, rel=0.05)
    assert len(set(span_lengths)) > 5, "span lengths vary"


@pytest.mark.parametrize("inputs_length,raw,targets", [(512, 568, 114), (128, 141, 29), (40, 44, 10)])
def test_inputs_and_targets_have_exactly_the_configured_lengths(inputs_length, raw, targets):
    """T5's own figures for 512 (568 raw tokens, 114 targets); every window gives the same lengths."""
    objective, rng = corruption(inputs_length), numpy.random.default_rng(1)
    assert (objective.raw_length, objective.targets_length) == (raw, targets)
    for _ in range(200):
        example = objective(rng.integers(2, 32000, raw))
        assert len(example["input_ids"]) == inputs_length
        assert len(example["labels"]) == len(example["decoder_input_ids"]) == targets
        numpy.testing.assert_array_equal(example["decoder_input_ids"], numpy.concatenate([[0], example["labels"][:-1]]))


def test_the_mask_depends_on_the_window_and_the_seed_only():
    window = numpy.random.default_rng(2).integers(2, 32000, corruption(128).raw_length)
    first, again, other_seed = corruption(128)(window), corruption(128)(window), corruption(128, seed=1)(window)
    assert all(numpy.array_equal(first[k], again[k]) for k in first)
    assert not numpy.array_equal(first["input_ids"], other_seed["input_ids"])


def t5_id_tokenizer(path) -> str:
    """A word-level tokenizer with T5's layout: the sentinels are its top 100 ids."""
    words = {EOD: 0, PAD: 1, "<unk>": 2} | {f"d{i}": i + 3 for i in range(2000)}
    vocab = words | {f"<extra_id_{k}>": len(words) + 99 - k for k in range(100)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


def test_loader_packs_span_corrupted_batches_per_dp_rank_and_resumes_exactly(tmp_path):
    write_id_corpus(tmp_path / "corpus", num_shards=4, docs_per_shard=20)
    cfg = DataConfig(sources=[{"path": tmp_path / "corpus"}], tokenizer=t5_id_tokenizer(tmp_path / "t.json"),
                     seq_len=40, shuffle_buffer=8, num_workers=1, span_corruption={})

    def loaders():
        return [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=2, seed=5) for r in range(2)]

    original = loaders()
    first = [next(loader) for loader in original]
    for batch in first:
        assert {k: tuple(v.shape) for k, v in batch.items()} == {
            "input_ids": (2, 40), "decoder_input_ids": (2, 10), "labels": (2, 10)}
        assert batch["labels"].max() == 2102 and batch["input_ids"].max() == 2102, "<extra_id_0> is the top id"
        assert (batch["labels"] != IGNORE_INDEX).all() and (batch["decoder_input_ids"][:, 0] == 1).all()  # pad starts
    assert not torch.equal(first[0]["labels"], first[1]["labels"]), "each DP rank reads its own shard"
    for _ in range(3):
        for loader in original:
            next(loader)
    states = through_a_checkpoint_file([loader.state_dict() for loader in original])
    expected = [[next(loader) for _ in range(10)] for loader in original]
    resumed = loaders()
    for loader in resumed:
        loader.load_state_dict(states)
    for rank_expected, loader in zip(expected, resumed):
        for batch in rank_expected:
            got = next(loader)
            assert all(torch.equal(got[k], batch[k]) for k in batch)


# --- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["parallel.tp=3"], "model.num_heads=4 is not divisible by parallel.tp=3; choose parallel.tp from [1, 2, 4]"),
    (["model.norm=layernorm"], "model.norm=layernorm: T5 normalises with RMSNorm"),
    (["model.feed_forward=swiglu"], "model.feed_forward: input should be 'relu' or 'gated-gelu'"),
    (["model.position_embedding=rotary"], "model.position_embedding applies to model.arch=gpt only"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel is not supported for model.arch=t5"),
    (["model.relative_attention_max_distance=16"], "model.relative_attention_max_distance=16 must exceed the exact offsets"),
    (["data.span_corruption.noise_density=1.5"], "data.span_corruption.noise_density: input should be less than 1"),
    (["data.seq_len=2"], "data.seq_len=2 is too short for span corruption"),
    (["data.seq_len=4096"], "data.seq_len=4096 makes 227 noise spans but the tokenizer has 100 sentinel tokens"),
])
def test_bad_t5_config_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/t5-tiny.yaml", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_t5_fields_on_a_gpt_config_name_the_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/gpt-tiny.yaml", "model.kv_channels=64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "model.kv_channels applies to model.arch=t5 only" in err, err
