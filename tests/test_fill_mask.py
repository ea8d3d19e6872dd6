"""Issue 27 point 5: `parallax fill-mask RUN|CHECKPOINT|HF_DIR --text "... <mask> ..." [--top-k K]` prints the
fillers transformers' fill-mask pipeline gives on the exported directory, in its order, with its scores;
`parallax generate` refuses an encoder in one line that points to fill-mask. One process, CPU."""
import pytest

from launcher.cli import main
from tests.test_export import TINY as GPT_TINY, _random_gpt_state, _write_checkpoint
from tests.test_export_bert import FAMILY, _bert_run, _hf_directory

TEXT = "d5 d17 <mask> d42 d8"


def _fillers(capsys, *args) -> list[tuple[float, str, str]]:
    capsys.readouterr()
    main(["fill-mask", *args])
    return [(float(score), token, sequence) for score, token, sequence in
            (line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t" in line)]


def _pipeline(directory, text, top_k):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(directory), top_k=top_k)(text)


@pytest.mark.parametrize("name", ["BERT", "RoBERTa"])
def test_fillers_from_a_run_are_the_pipelines_on_its_export(tmp_path, capsys, name):
    run, _, _ = _bert_run(tmp_path, FAMILY[name][1])
    main(["export", str(run), "--out", str(tmp_path / "hf")])
    ours = _fillers(capsys, str(run), "--text", TEXT, "--top-k", "7")
    theirs = _pipeline(tmp_path / "hf", TEXT, 7)
    assert [token for _, token, _ in ours] == [f["token_str"] for f in theirs]
    assert [sequence for _, _, sequence in ours] == [f["sequence"] for f in theirs]
    assert [score for score, _, _ in ours] == pytest.approx([f["score"] for f in theirs], abs=1e-4)
    assert len(set(token for _, token, _ in ours)) == 7


def test_fillers_from_a_hugging_face_directory_whose_mask_is_spelt_otherwise(tmp_path, capsys):
    """A BERT directory whose tokenizer's mask is [MASK]: the text's <mask> is that token."""
    directory = _hf_directory(tmp_path / "bert", "bert", mask="[MASK]")
    ours = _fillers(capsys, str(directory), "--text", TEXT)
    theirs = _pipeline(directory, TEXT.replace("<mask>", "[MASK]"), 5)
    assert [token for _, token, _ in ours] == [f["token_str"] for f in theirs] and len(ours) == 5


def test_generate_refuses_an_encoder_pointing_to_fill_mask(tmp_path, capsys):
    run, _, _ = _bert_run(tmp_path, FAMILY["BERT"][1])
    directory = _hf_directory(tmp_path / "bert", "bert")
    for path in (run, directory):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:
            main(["generate", str(path), "--prompt", "d1 d2"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1, err
        assert f"use `parallax fill-mask {path} --text" in err


@pytest.mark.parametrize("make,args,expected", [
    ("bert", ["--text", "d1 d2"], "--text has no <mask>"),
    ("bert", ["--text", TEXT, "--top-k", "0"], "--top-k 0: print at least 1 filler"),
    ("bert", ["--text", " ".join(["d1"] * 20) + " <mask>"], "--text is 21 tokens, more than the model's context of 16"),
    ("gpt", ["--text", TEXT], "continues text rather than filling masks; use `parallax generate"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, make, args, expected):
    if make == "bert":
        path, _, _ = _bert_run(tmp_path, FAMILY["BERT"][1])
    else:
        from tests.data.corpora import write_id_tokenizer

        tokenizer = write_id_tokenizer(tmp_path / "tokenizer.json", 397)
        path = _write_checkpoint(tmp_path / "step-00000001", [*GPT_TINY, f"data.tokenizer={tokenizer}"],
                                 _random_gpt_state(512))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["fill-mask", str(path), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and expected in err, err
