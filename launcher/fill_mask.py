"""`parallax fill-mask`: an encoder's most likely fillers for each mask in a text, with transformers' fill-mask
pipeline.

As `parallax generate` does, a Parallax run or checkpoint becomes its exact Hugging Face twin in memory
(models/huggingface/bert.py) and a Hugging Face directory loads as transformers loads it, so the fillers, their
order and their scores are those `transformers.pipeline("fill-mask")` gives on the directory `parallax export`
writes. The text names a mask `<mask>` whatever the model's tokenizer calls it (BERT's is `[MASK]`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MASK_IN_TEXT = "<mask>"


def check_top_k(top_k: int) -> None:
    from launcher.config import ConfigError

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: print at least 1 filler")


def fill_mask(model, tokenizer, text: str, top_k: int) -> list[list[dict]]:
    """For each mask in `text`, in order, the pipeline's top_k fillers: dicts of score, token (id), token_str
    and sequence (the text with that filler)."""
    from transformers import pipeline

    from launcher.config import ConfigError

    if tokenizer.mask_token is None:
        raise ConfigError("the model's tokenizer has no mask token; export it from a run with data.masked_lm, or "
                          "give a directory whose tokenizer_config.json names one")
    text = text.replace(MASK_IN_TEXT, tokenizer.mask_token)
    ids = tokenizer(text).input_ids
    masks = ids.count(tokenizer.mask_token_id)
    if masks == 0:
        raise ConfigError(f"--text has no {MASK_IN_TEXT}; put one where a word is missing, e.g. "
                          f"--text \"The capital of France is {MASK_IN_TEXT}.\"")
    context = model.config.max_position_embeddings - getattr(model.config, "pad_token_id", 0) - 1 \
        if model.config.model_type == "roberta" else model.config.max_position_embeddings
    if len(ids) > context:
        raise ConfigError(f"--text is {len(ids)} tokens, more than the model's context of {context} (model.max_seq_len); "
                          "shorten it")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, device=model.device, top_k=top_k)
    results = fill(text)
    return [results] if masks == 1 else results


def render(results: list[list[dict]]) -> str:
    """One line per filler, most likely first: its score, the token and the text it makes; a header per mask
    when the text has several."""
    lines = []
    for i, fillers in enumerate(results):
        if len(results) > 1:
            lines.append(f"mask {i + 1}:")
        lines += [f"{f['score']:.4g}\t{f['token_str']}\t{f['sequence']}" for f in fillers]
    return "\n".join(lines)


def run(path: Path, step: Optional[int], text: str, top_k: int) -> str:
    from launcher.generate import load

    check_top_k(top_k)
    with load(path, step, "fill-mask") as (model, tokenizer):
        return render(fill_mask(model, tokenizer, text, top_k))
