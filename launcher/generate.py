"""`parallax generate`: sample a prompt's continuation in one process, with transformers' `generate`.

A Parallax run or checkpoint becomes its exact Hugging Face twin in memory (models/huggingface), so
the tokens are the ones `generate` gives on the directory `parallax export` writes, and the decoding
(greedy, temperature, top-k, top-p, the KV cache, stopping at the end-of-text token) is the one
Hugging Face users know rather than a second one to keep equal to it. A Hugging Face directory loads
as transformers loads it. An encoder-decoder (T5) reads the prompt as its encoder input and prints
its decoder's output alone; a decoder-only model prints the prompt followed by its continuation.

The defaults are the sampling Megatron's and Hugging Face's users know: temperature 1 (the model's
own distribution), no top-k, no top-p; temperature 0 is greedy. The default seed is fixed, so the
same command prints the same text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: every token
    top_p: float = 1.0  # 1: every token
    seed: int = 1234

    def check(self) -> None:
        """Before the model loads, so a mistyped flag costs no wait."""
        from launcher.config import ConfigError

        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}: generate at least 1 token")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p}: must be in (0, 1]; 1 keeps every token")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}: must be 0 (every token) or more")

    def generate_kwargs(self) -> dict:
        """transformers' names for it. Every sampling field is passed, so the model's own generation
        config (Hugging Face's default top_k is 50) does not sample differently from what was asked."""
        if self.temperature == 0:
            return dict(max_new_tokens=self.max_new_tokens, do_sample=False)
        return dict(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p)


def load(path: Path, step: Optional[int]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode, on the GPU if there is one) and tokenizer of a Hugging Face directory or of a
    Parallax run or checkpoint, told apart by config.json; or one line naming what `path` lacks."""
    import torch
    import transformers

    from parallel.checkpoint import MANIFEST, CheckpointError, checkpoints_newest_first

    # stderr is for errors, stdout for the text alone: no progress bars, and none of transformers' warnings,
    # such as that a T5.1.1's own output matrix is left untied, which is right (models/huggingface/t5.py)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "config.json").is_file():
        model, tokenizer = _load_hf_directory(path, step)
    elif (path / MANIFEST).is_file() or (path / "checkpoints").is_dir() or checkpoints_newest_first(path):
        model, tokenizer = _load_checkpoint(path, step)
    else:
        raise CheckpointError(f"{path}: neither a Parallax run or checkpoint (no checkpoints/, step-*/ or "
                              f"{MANIFEST}) nor a Hugging Face model directory (no config.json)")
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


def _load_checkpoint(path: Path, step: Optional[int]):
    from launcher.twin_checkpoint import read_twin_checkpoint
    from models.huggingface import to_hf_model
    from models.huggingface.tokenizer import hf_tokenizer
    from parallel.checkpoint import read_weights

    checkpoint = read_twin_checkpoint(path, step, "generate from")
    special = checkpoint.cfg.data.special_tokens
    model = to_hf_model(read_weights(checkpoint.path), checkpoint.cfg.model, checkpoint.vocab_size,
                        checkpoint.tokenizer, special=special)
    return model, hf_tokenizer(checkpoint.tokenizer, special)


def _load_hf_directory(path: Path, step: Optional[int]):
    """Checked first (config.json, every weight file and its tensors' dtypes, the tokenizer), so a partial,
    quantized or rewritten directory costs one line rather than transformers' traceback or a silent cast."""
    import transformers

    from launcher.config import ConfigError
    from models.huggingface import HuggingFaceError, check_weights, read_config

    if step is not None:
        raise ConfigError(f"--step {step}: {path} is a Hugging Face model directory, which holds one model")
    twin, _ = read_config(path)
    check_weights(path)
    if not (path / "tokenizer.json").is_file():
        raise HuggingFaceError(f"{path / 'tokenizer.json'}: not found; generate needs the model's tokenizer "
                               "(`parallax export` writes it)")
    model = getattr(transformers, twin.AUTO_CLASS).from_pretrained(str(path))
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path))


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling) -> str:
    """The text to print: the prompt and its continuation (an encoder-decoder's output alone), without the
    tokens generation adds around text (begin, end, padding); others, such as T5's sentinels, are kept."""
    import torch

    from launcher.config import ConfigError

    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    prompt_len = prompt_ids.shape[1]
    if prompt_len == 0:
        raise ConfigError("--prompt is empty; give the text to continue")
    context = getattr(model.config, "max_position_embeddings", None)  # None: relative positions (T5), no limit
    if context is not None and prompt_len + sampling.max_new_tokens > context:
        raise ConfigError(f"--prompt is {prompt_len} tokens and --max-new-tokens {sampling.max_new_tokens}: "
                          f"{prompt_len + sampling.max_new_tokens} exceed the model's context of {context} "
                          "(model.max_seq_len); shorten one")
    torch.manual_seed(sampling.seed)
    # The ids alone: a tokenizer that also returns token_type_ids would have GPT-2 add them to its embeddings.
    ids = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), **sampling.generate_kwargs())
    ids = ids[0].tolist()
    added = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    text = lambda ids: tokenizer.decode([t for t in ids if t not in added])  # noqa: E731
    if model.config.is_encoder_decoder:
        return text(ids)
    # Decoded whole, since a tokenizer may join tokens (a space between words); the prompt is printed as given.
    return prompt + text(ids)[len(text(ids[:prompt_len])):]
