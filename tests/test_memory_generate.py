"""Issue 26 point 5, generation: `parallax generate` on a recurrent memory model (model.memory), which has no
Hugging Face twin, decodes it a segment at a time (launcher/memory_generate.py). Its greedy text is what
re-running the whole text through GPT.forward_with_memory gives at each token, across segment boundaries and
past model.max_seq_len; the tensors it holds do not grow with the prompt; sampling takes its seed, top-k and
top-p; export still refuses the model in one line."""
import subprocess
import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from launcher.cli import main
from tests.data.corpora import write_id_corpus, write_id_tokenizer

MEM_TOKENS, SEGMENT_LEN, NEW_TOKENS = 4, 8, 24
# 4 whole segments and 5 tokens: more than the model's 32 positions; 24 new tokens cross 3 segment boundaries
PROMPT_LEN = 4 * SEGMENT_LEN + 5
WORDS = 3  # d<i> is the tokenizer's id i + 3, after <|endoftext|> (0), <pad> and <unk>
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where `parallax generate` runs the model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A memory model trained 2 steps by `parallax train` on documents of one-token words. Its output layer is
    its own and its weights are drawn wide (init_std 0.2): a model this young with GPT-2's tied embedding
    greedily repeats the prompt's last token, which would compare little."""
    tmp = tmp_path_factory.mktemp("memory-generate")
    write_id_corpus(tmp / "corpus", 1, 200)
    tokenizer = write_id_tokenizer(tmp / "tokenizer.json", 397)
    proc = subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", "train", "configs/gpt-tiny.yaml",
         "model.num_layers=2", "model.hidden_size=64", "model.max_seq_len=32", "model.tie_embeddings=false",
         "model.init_std=0.2", f"model.memory.num_mem_tokens={MEM_TOKENS}", f"model.memory.segment_len={SEGMENT_LEN}",
         "data.seq_len=32", f"data.sources=[{{path: {tmp / 'corpus'}}}]", f"data.tokenizer={tokenizer}",
         "train.steps=2", "train.eval_interval=0", f"logging.run_dir={tmp / 'run'}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def greedy(run) -> list[int]:
    """A prompt's ids and 24 greedy new ones, each the argmax at the last position of forward_with_memory over the
    whole text so far (in the true vocabulary, not the padding rows): no state is kept between tokens. The prompt
    is the first of a few whose continuation has words only (no end-of-text token cutting it short) and not a
    few repeated, which would compare little: which one depends on the training alone."""
    from launcher.config import load_config
    from models.gpt import GPT
    from parallel.checkpoint import find_checkpoint, read_weights
    from parallel.topology import single_process_world

    checkpoint = find_checkpoint(run)
    cfg = load_config(checkpoint / "config.yaml")
    vocab_size = cfg.check_vocab_size()
    with single_process_world(), torch.no_grad():
        with torch.device(DEVICE):
            model = GPT(cfg.model, vocab_size)
        model.load_state_dict(read_weights(checkpoint))
        model.eval()
        for first in range(0, 397, 50):
            ids = [WORDS + (first + i) % 397 for i in range(PROMPT_LEN)]
            for _ in range(NEW_TOKENS):
                logits = model.forward_with_memory(torch.tensor([ids], device=DEVICE))
                ids.append(int(logits[-1, 0, :vocab_size].argmax()))
            if min(ids[PROMPT_LEN:]) >= WORDS and len(set(ids[PROMPT_LEN:])) >= 8:
                return ids
    pytest.fail("every prompt's greedy text ends early or repeats a few tokens")


def text(ids: list[int]) -> str:
    return " ".join(f"d{i - WORDS}" for i in ids)


def generate(capsys, run, prompt: str, *flags) -> str:
    capsys.readouterr()
    main(["generate", str(run), "--prompt", prompt, *flags])
    captured = capsys.readouterr()
    assert captured.err == "", captured.err
    return captured.out


def test_greedy_is_the_whole_text_rerun_at_each_token(capsys, run, greedy):
    out = generate(capsys, run, text(greedy[:PROMPT_LEN]), "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))
    assert out == text(greedy) + "\n"


def test_sampling_repeats_with_its_seed_and_differs_across_seeds(capsys, run, greedy):
    prompt = text(greedy[:PROMPT_LEN])
    first, again, other = (generate(capsys, run, prompt, "--seed", seed, "--max-new-tokens", "20")
                           for seed in ("1", "1", "2"))
    assert first == again != other and first.startswith(prompt)


@pytest.mark.parametrize("flags", [["--top-k", "1"], ["--top-p", "1e-6"]])
def test_top_k_and_top_p_reach_the_sampler(capsys, run, greedy, flags):
    """Keeping only the most likely token makes sampling greedy, at any temperature."""
    prompt = text(greedy[:PROMPT_LEN])
    assert generate(capsys, run, prompt, "--temperature", "5", *flags, "--max-new-tokens", str(NEW_TOKENS)) == \
        text(greedy) + "\n"


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes that the tensors made by the ops run under it held at once: each storage counted once,
    however many views share it, until the last of them is freed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0  # storage address -> [bytes, tensors seen on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes():
                self._hold(tensor)
        return out

    def _hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        entry = self.live.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        entry[1] += 1
        weakref.finalize(tensor, self._release, storage.data_ptr())

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[address]
            self.now -= entry[0]


def test_decoding_holds_the_same_tensors_whatever_the_prompt_length(run):
    """A prompt of 64 segments and one of 4 (and 3 tokens): decoding 16 tokens after each holds at most the
    same bytes of tensors. The meter is shown to see what keeping the segments would cost: the whole-text
    forward, which holds every segment's logits, grows with the prompt."""
    from launcher.generate import Sampling, load
    from launcher.memory_generate import continuation

    prompts = {segments: [WORDS + i % 397 for i in range(segments * SEGMENT_LEN + 3)] for segments in (4, 64)}
    decoding, whole_text = {}, {}
    with load(run, None) as (model, _):
        for segments, prompt in prompts.items():
            with LiveTensorBytes() as meter:
                continuation(model, prompt, Sampling(max_new_tokens=16, temperature=0), end=None)
            decoding[segments] = meter.peak
            with LiveTensorBytes() as meter, torch.no_grad():
                model.gpt.forward_with_memory(torch.tensor([prompt], device=DEVICE))
            whole_text[segments] = meter.peak
    assert decoding[64] == decoding[4] > 0, decoding
    assert whole_text[64] > 8 * whole_text[4], whole_text


def test_export_still_refuses_a_memory_model_in_one_line(capsys, run, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(["export", str(run), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"parallax: error: cannot export {run / 'checkpoints' / 'step-00000002'}: model.memory: a "
                          "recurrent memory model has no Hugging Face twin"), err
