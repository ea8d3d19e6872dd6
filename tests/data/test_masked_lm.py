"""Issue 27 point 2: masked language modelling in the data pipeline.

The masked batches are checked against the same stream unmasked: a next-token loader with data.seq_len
one shorter cuts the very same windows, so every chosen token, replacement and label can be compared
with the original it came from.
"""
import numpy
import pytest
import torch
from tokenizers import Tokenizer

from data_pipeline import EOD, MASK, PAD, SPECIAL_TOKENS, DataConfig, DataError, build_dataloader
from data_pipeline.loader import training_plan
from data_pipeline.masked_lm import EVALUATION_EPOCH, WORD_START
from data_pipeline.span_corruption import IGNORE_INDEX
from data_pipeline.validation import validation_batches
from launcher.cli import main

from .corpora import id_config, write_id_corpus, write_id_tokenizer, write_jsonl
from .test_resume import run_and_resume

SEQ = 64


@pytest.fixture(scope="module")
def mask_id_tokenizer(tmp_path_factory):
    """The word-level id tokenizer with a mask token: each word d<i> is one token."""
    return write_id_tokenizer(tmp_path_factory.mktemp("mask_id") / "tokenizer.json", 2000,
                              specials=(EOD, PAD, "<unk>", MASK))


def real_text(stdlib_corpus, bpe_tokenizer, **overrides) -> DataConfig:
    fields = dict(sources=[{"path": stdlib_corpus}], tokenizer=bpe_tokenizer, shuffle_buffer=16, num_workers=0,
                  validation_fraction=0.0)
    return DataConfig(**(fields | overrides))


def masked_and_original(stdlib_corpus, bpe_tokenizer, batches: int, **masked_lm):
    """(input_ids, labels, original windows), each [batches x 16, SEQ], of the same stream."""
    def loader(cfg):
        return build_dataloader(cfg, micro_batch_size=16, dp_rank=0, dp_size=1, seed=0)

    masked = loader(real_text(stdlib_corpus, bpe_tokenizer, seq_len=SEQ, masked_lm=masked_lm))
    plain = loader(real_text(stdlib_corpus, bpe_tokenizer, seq_len=SEQ - 1))
    pairs = [(next(masked), next(plain)) for _ in range(batches)]
    return tuple(torch.cat(parts) for parts in zip(*[(m["input_ids"], m["labels"], p) for m, p in pairs]))


def special_ids(tokenizer_path) -> torch.Tensor:
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return torch.tensor([tokenizer.token_to_id(token) for token in SPECIAL_TOKENS])


def test_a_large_sample_chooses_15_percent_of_the_tokens_and_replaces_them_80_10_10(stdlib_corpus, bpe_tokenizer):
    inputs, labels, original = masked_and_original(stdlib_corpus, bpe_tokenizer, batches=50)
    assert inputs.shape == labels.shape == original.shape == (800, SEQ) and inputs.dtype == labels.dtype == torch.int64
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], original[chosen]), "a label is the original token"
    assert torch.equal(inputs[~chosen], original[~chosen]), "a token not chosen is left as it is"
    special = torch.isin(original, special_ids(bpe_tokenizer))
    assert special.sum() > 50, "the sample holds separators that could be chosen"
    assert not (chosen & special).any(), "a special token was chosen"
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.003)

    mask = Tokenizer.from_file(str(bpe_tokenizer)).token_to_id(MASK)
    masked, kept = inputs[chosen] == mask, inputs[chosen] == original[chosen]
    randomised = ~masked & ~kept
    assert masked.float().mean() == pytest.approx(0.8, abs=0.02)
    assert randomised.float().mean() == pytest.approx(0.1, abs=0.015)
    assert kept.float().mean() == pytest.approx(0.1, abs=0.015)
    drawn = inputs[chosen][randomised]
    assert not torch.isin(drawn, special_ids(bpe_tokenizer)).any(), "a special token was drawn as a replacement"
    assert len(drawn.unique()) > 300, "replacements are drawn from the whole vocabulary"


def words(row: list[int], special: set[int], starts_word: list[bool]) -> list[list[int]]:
    """The positions of each word of a window: a word starts at a token starting with 'Ġ', at the window's
    start and after a special token; special tokens belong to none."""
    found, current = [], None
    for position, token in enumerate(row):
        if token in special:
            current = None
            continue
        if current is None or starts_word[token]:
            current = []
            found.append(current)
        current.append(position)
    return found


def partly_chosen_words(labels: torch.Tensor, original: torch.Tensor, tokenizer_path) -> tuple[int, int]:
    """(words chosen in part only, words of several tokens chosen whole) over all windows."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    starts_word = [tokenizer.id_to_token(i).startswith(WORD_START) for i in range(tokenizer.get_vocab_size())]
    special = set(special_ids(tokenizer_path).tolist())
    partial = whole = 0
    for row, chosen in zip(original.tolist(), (labels != IGNORE_INDEX).tolist()):
        for word in words(row, special, starts_word):
            count = sum(chosen[p] for p in word)
            partial += 0 < count < len(word)
            whole += count == len(word) > 1
    return partial, whole


def test_whole_word_masking_chooses_every_token_of_a_word_or_none(stdlib_corpus, bpe_tokenizer):
    inputs, labels, original = masked_and_original(stdlib_corpus, bpe_tokenizer, batches=10, whole_word=True)
    partial, whole = partly_chosen_words(labels, original, bpe_tokenizer)
    assert partial == 0 and whole > 100
    chosen = labels != IGNORE_INDEX
    special = torch.isin(original, special_ids(bpe_tokenizer))
    assert 0.13 < chosen.sum() / (~special).sum() <= 0.15
    _, token_labels, token_original = masked_and_original(stdlib_corpus, bpe_tokenizer, batches=10)
    assert partly_chosen_words(token_labels, token_original, bpe_tokenizer)[0] > 100, "the check can fail"


def test_a_window_is_masked_anew_each_epoch_as_a_function_of_seed_window_and_epoch(tmp_path, mask_id_tokenizer):
    """One shard of four documents of one window each, read in order: every epoch makes the same four windows."""
    write_jsonl(tmp_path / "corpus.jsonl", [" ".join([f"d{i}"] * (SEQ - 1)) for i in range(4)])
    cfg = id_config(tmp_path / "corpus.jsonl", mask_id_tokenizer, seq_len=SEQ, shuffle_buffer=1, num_workers=0,
                    epochs=3, masked_lm={})

    def epochs(seed: int) -> list[dict]:
        return list(build_dataloader(cfg, micro_batch_size=4, dp_rank=0, dp_size=1, seed=seed))

    first = epochs(seed=0)
    assert len(first) == 3
    original = [torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"]) for b in first]
    assert torch.equal(original[0], original[1]) and torch.equal(original[0], original[2]), "the same windows"
    for earlier, later in [(0, 1), (0, 2), (1, 2)]:
        for row in range(4):
            assert not torch.equal(first[earlier]["labels"][row], first[later]["labels"][row]), (earlier, later, row)
    objective = training_plan(cfg, seed=0).masked_lm
    for epoch, batch in enumerate(first):
        for row, window in enumerate(original[epoch].numpy()):
            inputs, labels = objective(window, epoch)
            assert numpy.array_equal(inputs, batch["input_ids"][row]) and numpy.array_equal(labels, batch["labels"][row])
    again, other_seed = epochs(seed=0), epochs(seed=1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert not torch.equal(first[0]["labels"], other_seed[0]["labels"])


def test_resuming_mid_run_gives_bitwise_the_same_masked_batches(tmp_path, mask_id_tokenizer):
    """40 steps after the stop cross epoch boundaries on this small corpus, with two workers per rank."""
    write_id_corpus(tmp_path / "corpus", num_shards=5, docs_per_shard=10)
    cfg = id_config(tmp_path / "corpus", mask_id_tokenizer, num_workers=2, masked_lm={})
    expected, resumed = run_and_resume(cfg, dp_size=2)
    for rank_expected, rank_resumed in zip(expected, resumed):
        for step, (a, b) in enumerate(zip(rank_expected, rank_resumed)):
            assert a.keys() == b.keys() == {"input_ids", "labels"} and a["input_ids"].shape == (2, 16)
            assert all(torch.equal(a[k], b[k]) for k in a), f"batch {step} differs after resume"


def masked_windows(loaders) -> list[tuple]:
    """Every real row of every batch of the loaders, run dry, as (original, input_ids, labels), sorted."""
    rows = []
    for loader in loaders:
        for batch in loader:
            original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
            rows += [tuple(map(tuple, row)) for row in zip(original.tolist(), batch["input_ids"].tolist(),
                                                           batch["labels"].tolist())]
    return sorted(row for row in rows if set(row[0]) != {1})  # not a row padding a last batch (all <pad>)


@pytest.mark.parametrize("dp_sizes", [(2, 3), (3, 2)], ids=lambda sizes: "->".join(map(str, sizes)))
def test_a_dp_change_masks_every_window_as_the_uninterrupted_run_does(tmp_path, mask_id_tokenizer, dp_sizes):
    """Each document is exactly three windows, each of its own word, so every layout cuts the same windows,
    each once per epoch: the resharded run must mask each in each epoch as the uninterrupted one. The stop
    catches windows carried over from documents of the second epoch, which the reshard hands to other lanes."""
    seq = 16
    (tmp_path / "corpus").mkdir()
    for shard in range(6):
        documents = [[f"d{3 * (shard * 4 + doc) + third}"] * seq for doc in range(4) for third in range(3)]
        write_jsonl(tmp_path / "corpus" / f"part-{shard}.jsonl",
                    [" ".join(sum(documents[3 * doc:3 * doc + 3], [])[:-1]) for doc in range(4)])  # [:-1]: room for EOD
    cfg = id_config(tmp_path / "corpus", mask_id_tokenizer, seq_len=seq, shuffle_buffer=2, num_workers=0, epochs=2,
                    masked_lm={})

    def start(dp_size, states=None):
        loaders = [build_dataloader(cfg, micro_batch_size=2, dp_rank=r, dp_size=dp_size, seed=7) for r in range(dp_size)]
        for loader in loaders if states is not None else ():
            loader.load_state_dict(states)
        return loaders

    before, after = dp_sizes
    uninterrupted = masked_windows(start(before))
    assert len(uninterrupted) == 2 * 24 * 3
    for first, second in zip(uninterrupted[::2], uninterrupted[1::2]):
        assert first[0] == second[0] and first[1:] != second[1:], "each window twice, masked anew in its second epoch"

    stopped = start(before)
    head = [next(loader) for _ in range(20) for loader in stopped]
    states = [loader.state_dict() for loader in stopped]
    carried = [run for state in states for lane in state["lanes"] for cursor in lane["sources"]
               for run in cursor["carry_epochs"]]
    assert any(epoch == 1 for _, epoch in carried), "the stop must catch second-epoch tokens in flight"
    assert masked_windows([head] + start(after, states)) == uninterrupted


def validation_rows(cfg, dp_size: int) -> list[dict]:
    """Every rank's validation micro-batches, back in the global order."""
    per_rank = [validation_batches(cfg, batches=4, micro_batch_size=4 // dp_size, grad_accum=1, dp_rank=r,
                                   dp_size=dp_size, seed=3) for r in range(dp_size)]
    return [{k: torch.cat([rank[i][k] for rank in per_rank]) for k in ("input_ids", "labels")}
            for i in range(len(per_rank[0]))]


def test_the_evaluation_mask_is_fixed_per_window_at_every_dp_size(stdlib_corpus, bpe_tokenizer):
    cfg = real_text(stdlib_corpus, bpe_tokenizer, seq_len=32, validation_fraction=0.1, masked_lm={})
    one, again, two = validation_rows(cfg, 1), validation_rows(cfg, 1), validation_rows(cfg, 2)
    assert len(one) == len(two) == 4
    for a, b, c in zip(one, again, two):
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
        assert (a["labels"] != IGNORE_INDEX).sum(dim=1).min() >= 3, "every window is scored"
    objective = training_plan(cfg, seed=3).masked_lm
    for batch in one:
        for inputs, labels in zip(batch["input_ids"], batch["labels"]):
            original = torch.where(labels != IGNORE_INDEX, labels, inputs).numpy()
            assert numpy.array_equal(objective(original, EVALUATION_EPOCH)[1], labels)


def test_rows_padding_a_finite_runs_last_batch_are_not_scored(tmp_path, mask_id_tokenizer):
    write_id_corpus(tmp_path / "corpus", num_shards=1, docs_per_shard=4)  # 46 words, 4 separators: 3 windows and 2 tokens
    cfg = id_config(tmp_path / "corpus", mask_id_tokenizer, epochs=1, num_workers=0, masked_lm={})
    batches = list(build_dataloader(cfg, micro_batch_size=3, dp_rank=0, dp_size=1, seed=0))
    assert len(batches) == 2
    last = batches[-1]
    assert (last["input_ids"][1:] == 1).all() and (last["labels"][1:] == IGNORE_INDEX).all()
    padded = last["input_ids"][0] == 1
    assert padded.any() and (last["labels"][0][padded] == IGNORE_INDEX).all(), "pad is never chosen"
    assert (last["labels"][0] != IGNORE_INDEX).any()


def test_a_tokenizer_without_the_mask_token_is_one_line_naming_data_tokenizer(tmp_path, id_tokenizer):
    write_id_corpus(tmp_path / "corpus", num_shards=1, docs_per_shard=5)
    with pytest.raises(DataError) as error:
        build_dataloader(id_config(tmp_path / "corpus", id_tokenizer, masked_lm={}), micro_batch_size=2, dp_rank=0,
                         dp_size=1, seed=0)
    message = str(error.value)
    assert message.startswith(f"data.tokenizer={id_tokenizer} has no mask token <mask> (data.masked_lm.mask_token)")
    assert "\n" not in message


def test_whole_words_need_a_tokenizer_that_marks_word_starts(tmp_path, mask_id_tokenizer):
    write_id_corpus(tmp_path / "corpus", num_shards=1, docs_per_shard=5)
    cfg = id_config(tmp_path / "corpus", mask_id_tokenizer, masked_lm={"whole_word": True})
    with pytest.raises(DataError, match=r"^data.masked_lm.whole_word finds words by the byte-level BPE's space marker"):
        build_dataloader(cfg, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)


@pytest.mark.parametrize("args,expected", [
    (["data.masked_lm.probability=1.5"], "data.masked_lm.probability: input should be less than 1; got 1.5"),
    (["data.masked_lm.probability=0"], "data.masked_lm.probability: input should be greater than 0; got 0"),
    (["data.masked_lm.mask_fraction=0.9", "data.masked_lm.random_fraction=0.2"],
     "data.masked_lm: mask_fraction=0.9 and random_fraction=0.2 add up to more than 1"),
    (["data.masked_lm={}", "data.span_corruption={}"],
     "data.span_corruption and data.masked_lm are different training objectives; keep one"),
])
def test_bad_masked_lm_config_is_one_line_naming_the_field(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "configs/gpt-tiny.yaml", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err, err
