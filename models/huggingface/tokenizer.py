"""Parallax's tokenizer (a `tokenizers.Tokenizer`) as a transformers tokenizer."""
from pathlib import Path


def hf_tokenizer(tokenizer):
    """Parallax's tokenizers.Tokenizer as a PreTrainedTokenizerFast, with its end-of-document token as eos
    (and bos, as GPT-2's), its padding token as pad, and the T5 sentinels it has as additional special
    tokens. Nothing is added around encoded text."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import EOD, PAD, SPECIAL_TOKENS

    present = lambda token: tokenizer.token_to_id(token) is not None  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOD if present(EOD) else None, bos_token=EOD if present(EOD) else None,
        pad_token=PAD if present(PAD) else None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS[2:] if present(t)],
        clean_up_tokenization_spaces=False, model_max_length=None,
    )


def write_tokenizer(tokenizer, out: Path) -> None:
    """`hf_tokenizer(tokenizer)` as a directory AutoTokenizer loads: tokenizer.json + tokenizer_config.json."""
    hf_tokenizer(tokenizer).save_pretrained(str(out))
