"""Parallax models as Hugging Face `transformers` models, and back: exact, in both directions.

Each architecture that has an exact Hugging Face twin has a module here that implements `Twin`:
GPT-2 (`gpt2`), Llama (`llama`) and T5 (`t5`); `bert` holds three, BERT, RoBERTa and Megatron-BERT. A twin maps the config and every tensor; nothing is
approximated, and a model with no exact twin is refused in one line naming what differs.

Parallax pads its vocabulary to a multiple of model.vocab_multiple; a Hugging Face model keeps the
tokenizer's true vocabulary (the first rows), as Megatron's converters do, so its logits are
Parallax's first `vocab_size` logits. Importing pads with zero rows.

transformers is imported only when a function here is called, so training does not pay for it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Protocol

import torch

from data_pipeline.config import SpecialTokens
from models.config import ModelConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PretrainedConfig, PreTrainedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class HuggingFaceError(ValueError):
    """A model or directory that cannot make the trip exactly; the message names the field or file."""


class Twin(Protocol):
    """One architecture's exact mapping to its transformers class (a module implements it)."""

    NAME: str  # how messages name it: "GPT-2"
    ARCH: str  # the model.arch it is a twin of: "gpt"
    MODEL_TYPE: str  # config.json's model_type: "gpt2"
    AUTO_CLASS: str  # the transformers Auto class that loads it: "AutoModelForCausalLM"

    def differences(self, cfg: ModelConfig) -> list[str]:
        """What makes `cfg` (of model.arch ARCH) something other than this twin, each in a few words naming
        the field; [] if it maps exactly."""

    def hf_config(self, cfg: ModelConfig, vocab_size: int, special: dict[str, Optional[int]]) -> PretrainedConfig:
        """The transformers config of the same model; `special`: eos/bos/pad/decoder_start token ids."""

    def to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
        """Parallax state dict (full tensors, TP=1 names) -> the twin's state dict, true vocabulary."""

    def from_hf(self, hf: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab_size: int) -> dict[str, torch.Tensor]:
        """The inverse; the vocabulary padded with zero rows."""

    def model_config(self, hf_config: PretrainedConfig) -> ModelConfig:
        """The Parallax model of a transformers config; HuggingFaceError naming a field it cannot hold."""


def _twins() -> list[Twin]:
    from models.huggingface import bert, gpt2, llama, t5

    return [gpt2, llama, t5, bert.BERT, bert.ROBERTA, bert.MEGATRON_BERT]


def twin_for(cfg: ModelConfig) -> Twin:
    """The twin that `cfg` maps to exactly; HuggingFaceError naming what differs from the closest one."""
    if cfg.memory is not None:
        raise HuggingFaceError("model.memory: a recurrent memory model has no Hugging Face twin (transformers has no "
                               "RMT), so it cannot be exported, generated from or started from through one")
    differences = {twin: twin.differences(cfg) for twin in _twins() if twin.ARCH == cfg.arch}
    closest = min(differences, key=lambda twin: len(differences[twin]))
    if differences[closest]:
        raise HuggingFaceError(f"no exact Hugging Face twin (closest: {closest.NAME}): {'; '.join(differences[closest])}")
    return closest


def special_token_ids(tokenizer: Optional[Tokenizer],
                      special: SpecialTokens = SpecialTokens()) -> dict[str, Optional[int]]:
    """config.json's eos/bos/pad ids: the run's end-of-document token (also bos, as GPT-2's) and padding token."""
    if tokenizer is None:
        return {"eos": None, "bos": None, "pad": None}
    eos = tokenizer.token_to_id(special.eod)
    return {"eos": eos, "bos": eos, "pad": tokenizer.token_to_id(special.pad)}


def padded_vocabulary(rows: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """A Hugging Face vocabulary matrix (the true vocabulary's rows) with zero rows up to Parallax's padded size."""
    return torch.cat([rows, rows.new_zeros(padded_vocab_size - rows.shape[0], rows.shape[1])])


def check_vocabulary(vocab_size: int, tokenizer: Tokenizer) -> None:
    """Every id the tokenizer produces must have a row in the model's true vocabulary."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise HuggingFaceError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary "
                               f"(model.vocab_size) is {vocab_size}: the exported model could not score its last ids")


def to_hf_model(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, tokenizer: Optional[Tokenizer],
                dtype: str = "fp32", special: SpecialTokens = SpecialTokens()) -> PreTrainedModel:
    """The transformers model holding `state` (full fp32 tensors), in eval mode. It is built without
    a random initialisation and every parameter comes from `state`: one the mapping left unset
    would still be NaN, and is an error. `special`: the run's data.eod_token and data.pad_token, which
    give config.json its eos/bos/pad ids."""
    import transformers
    from transformers.initialization import no_init_weights

    twin = twin_for(cfg)
    config = twin.hf_config(cfg, vocab_size, special_token_ids(tokenizer, special))
    with no_init_weights():
        model = getattr(transformers, twin.AUTO_CLASS).from_config(config)
    hf_state = twin.to_hf(state, cfg, vocab_size)
    for p in model.parameters():
        p.data.fill_(float("nan"))
    unexpected = model.load_state_dict(hf_state, strict=False).unexpected_keys
    # Tie what the mapping left out, as from_pretrained does: a T5.1.1's own output matrix stays its own
    # (transformers 5 declares every T5 tied, and unties what a file holds twice with different values).
    model.tie_weights(missing_keys=set(model.state_dict()) - set(hf_state))
    unset = [name for name, p in model.named_parameters() if p.isnan().any()]
    if unexpected or unset:
        raise AssertionError(f"{twin.NAME} mapping: names it does not have {unexpected}, tensors left unset {unset}")
    return model.to(DTYPES[dtype]).eval()


def export(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, tokenizer: Optional[Tokenizer],
           out: Path, dtype: str = "fp32", special: SpecialTokens = SpecialTokens()) -> Twin:
    """Write a Hugging Face model directory (config.json, model.safetensors, tokenizer files) that
    transformers' Auto classes load with no custom code; returns the twin it was written as. `special`
    names the run's end-of-document and padding tokens, the directory's eos and pad."""
    from models.huggingface.tokenizer import write_tokenizer

    model = to_hf_model(state, cfg, vocab_size, tokenizer, dtype, special)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        write_tokenizer(tokenizer, Path(out), special)
    return twin_for(cfg)


@dataclass
class Imported:
    """A Hugging Face directory as Parallax holds it."""

    model: ModelConfig
    vocab_size: int  # the true vocabulary; the model pads it
    state: dict[str, torch.Tensor]  # full fp32 tensors, TP=1 names
    tokenizer_path: Optional[Path]  # its tokenizer.json, if it has one
    twin: Twin


def read_config(directory: Path) -> tuple[Twin, PretrainedConfig]:
    """The twin and transformers config of a Hugging Face directory, or one line naming what is wrong."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not directory.is_dir():
        raise HuggingFaceError(f"{directory}: no such directory; give a Hugging Face model directory")
    if not (directory / "config.json").is_file():
        raise HuggingFaceError(f"{directory / 'config.json'}: not found; a Hugging Face model directory has one")
    try:
        fields = json.loads((directory / "config.json").read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"a JSON object of fields is expected, not {type(fields).__name__}")
        model_type = fields.get("model_type")
        hf_config = AutoConfig.from_pretrained(str(directory))
    except Exception as error:  # transformers' validation raises types of its own (huggingface_hub's), which vary
        raise HuggingFaceError(f"{directory / 'config.json'}: transformers cannot read it "
                               f"({' '.join(str(error).split())[:200]}); fix or replace the file") from None
    twin = next((t for t in _twins() if t.MODEL_TYPE == model_type), None)
    if twin is None:
        raise HuggingFaceError(f"{directory / 'config.json'}: model_type {model_type!r} has no Parallax twin; "
                               f"Parallax holds {', '.join(t.MODEL_TYPE for t in _twins())}")
    return twin, hf_config


def weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards its index names; HuggingFaceError naming the one that is missing.
    Cheap, so a run can refuse a directory without weights before any rank starts."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise HuggingFaceError(f"{directory}: no model.safetensors (nor its index); save the model with "
                               "save_pretrained(safe_serialization=True)")
    for name in names:
        if not (directory / name).is_file():
            raise HuggingFaceError(f"{directory / name}: not found, though {index.name} names it; the directory is partial")
    return [directory / name for name in names]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards its index names, as stored."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = {}
    for path in weight_files(directory):
        try:
            weights.update(load_file(str(path)))
        except SafetensorError as error:
            raise HuggingFaceError(f"{path}: unreadable ({error}); the file is partial or damaged") from None
    return weights


# safetensors' dtype codes as torch names them: how messages and config.json's dtype field name a dtype
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def check_weights(directory: Path) -> None:
    """Every weight of the model, as its file's header describes it, is what config.json says: floating
    point, of config.json's `dtype` (`torch_dtype` before transformers 5), of the shape the config makes;
    else HuggingFaceError naming the file, the tensor and the field. Mapped to fp32, a quantized copy or a
    file rewritten in another dtype would train or generate from other numbers than the model's, silently.
    Reads headers only, so a run or `generate` refuses the directory before loading anything."""
    import transformers
    from safetensors import SafetensorError, safe_open

    twin, hf_config = read_config(directory)
    with torch.device("meta"):
        expected = getattr(transformers, twin.AUTO_CLASS).from_config(hf_config).state_dict()
    fields = json.loads((Path(directory) / "config.json").read_text())
    field = "dtype" if "dtype" in fields else "torch_dtype"
    for path in weight_files(directory):
        try:
            with safe_open(str(path), "pt") as f:
                stored = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape())
                          for name in f.keys() if name in expected}
        except SafetensorError as error:
            raise HuggingFaceError(f"{path}: unreadable ({error}); the file is partial or damaged") from None
        for name, (code, shape) in stored.items():
            dtype = SAFETENSORS_DTYPES.get(code, code)
            if not code.startswith(("F", "BF")):
                raise HuggingFaceError(f"{path}: {name} is {dtype}, not floating point (a quantized checkpoint?); "
                                       "Parallax reads only a model's floating-point weights")
            if fields.get(field) not in (None, dtype):
                raise HuggingFaceError(f"{path}: {name} is {dtype} but config.json's {field} is {fields[field]}: "
                                       "these are not the weights the model was saved with")
            if tuple(shape) != tuple(expected[name].shape):
                raise HuggingFaceError(f"{path}: {name} has shape {tuple(shape)} but config.json makes it "
                                       f"{tuple(expected[name].shape)}")


def import_directory(directory: Path, cfg: Optional[ModelConfig] = None) -> Imported:
    """A Hugging Face directory's model config, weights (mapped, fp32) and tokenizer path. `cfg`: the
    model to map them into, when a run holds the directory's model with choices of its own (such as
    model.vocab_multiple, which sets the padding); default the directory's."""
    twin, hf_config = read_config(directory)
    cfg = cfg or twin.model_config(hf_config)
    check_weights(directory)
    hf = read_weights(directory)
    weights_file = Path(directory) / "model.safetensors"
    try:
        state = twin.from_hf({k: v.float() for k, v in hf.items()}, cfg, cfg.padded_vocab_size(hf_config.vocab_size))
    except KeyError as missing:
        raise HuggingFaceError(f"{weights_file} lacks {missing.args[0]}: the directory is partial") from None
    tokenizer = Path(directory) / "tokenizer.json"
    return Imported(cfg, hf_config.vocab_size, state, tokenizer if tokenizer.is_file() else None, twin)
