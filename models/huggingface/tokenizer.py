"""Parallax's tokenizer (a `tokenizers.Tokenizer`) as a transformers tokenizer."""
from pathlib import Path

from data_pipeline.config import SpecialTokens


def hf_tokenizer(tokenizer, special: SpecialTokens = SpecialTokens()):
    """Parallax's tokenizers.Tokenizer as a PreTrainedTokenizerFast, with the run's end-of-document token
    (`special.eod`) as eos (and bos, as GPT-2's), its padding token as pad, its mask token (`special.mask`,
    data.masked_lm.mask_token) as mask, which transformers' fill-mask pipeline looks for, and the T5
    sentinels it has as additional special tokens. Nothing is added around encoded text."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import SPECIAL_TOKENS

    present = lambda token: token if tokenizer.token_to_id(token) is not None else None  # noqa: E731
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=present(special.eod), bos_token=present(special.eod), pad_token=present(special.pad),
        mask_token=present(special.mask),
        # the T5 sentinels, and the built-in mask token where the run masks with another
        additional_special_tokens=[t for t in SPECIAL_TOKENS[2:] if present(t) and t != special.mask],
        clean_up_tokenization_spaces=False, model_max_length=None,
    )


def write_tokenizer(tokenizer, out: Path, special: SpecialTokens = SpecialTokens()) -> None:
    """`hf_tokenizer(tokenizer, special)` as a directory AutoTokenizer loads: tokenizer.json + tokenizer_config.json."""
    hf_tokenizer(tokenizer, special).save_pretrained(str(out))
