"""`parallax generate`: sample a prompt's continuation in one process, with transformers' `generate`.

A Parallax run or checkpoint becomes its exact Hugging Face twin in memory (models/huggingface), so
the tokens are the ones `generate` gives on the directory `parallax export` writes, and the decoding
(greedy, temperature, top-k, top-p, the KV cache, stopping at the end-of-text token) is the one
Hugging Face users know rather than a second one to keep equal to it. A Hugging Face directory loads
as transformers loads it. An encoder-decoder (T5) reads the prompt as its encoder input and prints
its decoder's output alone; a decoder-only model prints the prompt followed by its continuation. A recurrent
memory model (model.memory) has no twin: Parallax's own GPT decodes it a segment at a time, with the same
sampling and memory that does not grow with the text (launcher/memory_generate.py).

The defaults are the sampling Megatron's and Hugging Face's users know: temperature 1 (the model's
own distribution), no top-k, no top-p; temperature 0 is greedy. The default seed is fixed, so the
same command prints the same text.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from launcher.memory_generate import MemoryModel

    Model = Union[PreTrainedModel, MemoryModel]  # transformers' (a twin or a directory), or a memory model


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


def check_task(arch: str, path: Path, task: str) -> None:
    """`generate` continues text, which an encoder (model.arch bert) cannot; `fill-mask` fills masks, which only
    an encoder is trained to: one line pointing to the command that fits the model."""
    from launcher.config import ConfigError

    if task == "generate" and arch == "bert":
        raise ConfigError(f"{path} is an encoder (BERT, masked language modelling): it fills masks rather than "
                          f"continuing text; use `parallax fill-mask {path} --text \"... <mask> ...\"`")
    if task == "fill-mask" and arch != "bert":
        raise ConfigError(f"{path} is a model.arch {arch} model, which continues text rather than filling masks; "
                          f"use `parallax generate {path} --prompt ...`, or fill masks with an encoder (model.arch bert)")


@contextmanager
def load(path: Path, step: Optional[int], task: str = "generate") -> Iterator[tuple[Model, PreTrainedTokenizerBase]]:
    """The model (eval mode, on the GPU if there is one) and tokenizer of a Hugging Face directory or of a
    Parallax run or checkpoint, told apart by config.json; or one line naming what `path` lacks, or that the
    model is not one `task` (generate, fill-mask) fits, before its weights load. A memory model lives only
    while the block runs (launcher/memory_generate.loaded)."""
    import torch
    import transformers

    from parallel.checkpoint import MANIFEST, CheckpointError, checkpoints_newest_first

    # stderr is for errors, stdout for the text alone: no progress bars, and none of transformers' warnings,
    # such as that a T5.1.1's own output matrix is left untied, which is right (models/huggingface/t5.py)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "config.json").is_file():
        model, tokenizer = _load_hf_directory(path, step, task)
        yield model.to(device), tokenizer
    elif (path / MANIFEST).is_file() or (path / "checkpoints").is_dir() or checkpoints_newest_first(path):
        with _load_checkpoint(path, step, device, task) as loaded:
            yield loaded
    else:
        raise CheckpointError(f"{path}: neither a Parallax run or checkpoint (no checkpoints/, step-*/ or "
                              f"{MANIFEST}) nor a Hugging Face model directory (no config.json)")


@contextmanager
def _load_checkpoint(path: Path, step: Optional[int], device, task: str):
    from launcher import memory_generate
    from launcher.twin_checkpoint import check_twin, read_checkpoint
    from models.huggingface import to_hf_model
    from models.huggingface.tokenizer import hf_tokenizer
    from parallel.checkpoint import read_weights

    checkpoint = read_checkpoint(path, step, "generate from" if task == "generate" else task)
    check_task(checkpoint.cfg.model.arch, path, task)
    special = checkpoint.cfg.data.special_tokens
    tokenizer = hf_tokenizer(checkpoint.tokenizer, special)
    if checkpoint.cfg.model.memory is not None:
        with memory_generate.loaded(checkpoint, device) as model:
            yield model, tokenizer
        return
    check_twin(checkpoint, "generate from" if task == "generate" else task)
    model = to_hf_model(read_weights(checkpoint.path), checkpoint.cfg.model, checkpoint.vocab_size,
                        checkpoint.tokenizer, special=special)
    yield model.to(device), tokenizer


def _load_hf_directory(path: Path, step: Optional[int], task: str):
    """Checked first (config.json, every weight file and its tensors' dtypes, the tokenizer), so a partial,
    quantized or rewritten directory costs one line rather than transformers' traceback or a silent cast."""
    import transformers

    from launcher.config import ConfigError
    from models.huggingface import HuggingFaceError, check_weights, read_config

    if step is not None:
        raise ConfigError(f"--step {step}: {path} is a Hugging Face model directory, which holds one model")
    twin, _ = read_config(path)
    check_task(twin.ARCH, path, task)
    check_weights(path)
    if not (path / "tokenizer.json").is_file():
        raise HuggingFaceError(f"{path / 'tokenizer.json'}: not found; {task} needs the model's tokenizer "
                               "(`parallax export` writes it)")
    model = getattr(transformers, twin.AUTO_CLASS).from_pretrained(str(path))
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path))


def generate(model: Model, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling) -> str:
    """The text to print: the prompt and its continuation (an encoder-decoder's output alone), without the
    tokens generation adds around text (begin, end, padding); others, such as T5's sentinels, are kept."""
    import torch

    from launcher.config import ConfigError
    from launcher.memory_generate import MemoryModel, continuation

    prompt_ids = tokenizer(prompt).input_ids
    if not prompt_ids:
        raise ConfigError("--prompt is empty; give the text to continue")
    torch.manual_seed(sampling.seed)
    if isinstance(model, MemoryModel):  # no context to exceed: it reads the text a segment at a time
        ids, encoder_decoder = prompt_ids + continuation(model, prompt_ids, sampling, tokenizer.eos_token_id), False
    else:
        ids, encoder_decoder = _transformers_generate(model, prompt_ids, sampling), model.config.is_encoder_decoder
    added = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    text = lambda ids: tokenizer.decode([t for t in ids if t not in added])  # noqa: E731
    if encoder_decoder:
        return text(ids)
    # Decoded whole, since a tokenizer may join tokens (a space between words); the prompt is printed as given.
    return prompt + text(ids)[len(text(ids[:len(prompt_ids)])):]


def _transformers_generate(model: PreTrainedModel, prompt_ids: list[int], sampling: Sampling) -> list[int]:
    """transformers' tokens: the prompt's and the new ones (an encoder-decoder's: the decoder start and the new)."""
    import torch

    from launcher.config import ConfigError

    context = getattr(model.config, "max_position_embeddings", None)  # None: relative positions (T5), no limit
    if context is not None and len(prompt_ids) + sampling.max_new_tokens > context:
        raise ConfigError(f"--prompt is {len(prompt_ids)} tokens and --max-new-tokens {sampling.max_new_tokens}: "
                          f"{len(prompt_ids) + sampling.max_new_tokens} exceed the model's context of {context} "
                          "(model.max_seq_len); shorten one")
    inputs = torch.tensor([prompt_ids], device=model.device)
    # The ids alone: a tokenizer that also returns token_type_ids would have GPT-2 add them to its embeddings.
    return model.generate(inputs, attention_mask=torch.ones_like(inputs), **sampling.generate_kwargs())[0].tolist()
