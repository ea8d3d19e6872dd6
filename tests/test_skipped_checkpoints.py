"""The commands that read a run's newest checkpoint (eval, export, checkpoint consolidate, generate) say
which newer checkpoint they skipped as damaged, and why, as a resume does: they used the one before it
without a word."""
import shutil

import pytest

from launcher.cli import main
from tests.data.corpora import write_id_tokenizer
from tests.test_export import TINY, _random_gpt_state, _write_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose step-2 checkpoint, the newest, has a shard altered on disk; step 1 is whole."""
    tmp = tmp_path_factory.mktemp("skipped")
    tokenizer = write_id_tokenizer(tmp / "tokenizer.json", 397)
    run = tmp / "run"
    good = _write_checkpoint(run / "checkpoints" / "step-00000001", [*TINY, f"data.tokenizer={tokenizer}"],
                             _random_gpt_state(512))
    damaged = run / "checkpoints" / "step-00000002"
    shutil.copytree(good, damaged)
    shard = bytearray((damaged / "shard-00000.pt").read_bytes())
    shard[len(shard) // 2] ^= 1
    (damaged / "shard-00000.pt").write_bytes(bytes(shard))
    return run


@pytest.mark.parametrize("command", [
    ["eval", "{run}"],
    ["export", "{run}", "--out", "{tmp}/hf"],
    ["checkpoint", "consolidate", "{run}", "--out", "{tmp}/model.pt"],
    ["generate", "{run}", "--prompt", "d5 d17", "--max-new-tokens", "2"],
])
def test_a_command_says_which_damaged_checkpoint_it_skipped(run, tmp_path, capsys, monkeypatch, command):
    launched = []
    monkeypatch.setattr("launcher.cli._launch", lambda entry_args, *_, **__: launched.append(entry_args))
    capsys.readouterr()
    main([arg.format(run=run, tmp=tmp_path) for arg in command])
    captured = capsys.readouterr()
    damaged, used = run / "checkpoints" / "step-00000002", run / "checkpoints" / "step-00000001"
    assert captured.err == (f"parallax: warning: skipping checkpoint step-00000002: {damaged / 'shard-00000.pt'} "
                            "does not match its checksum in the manifest (altered or corrupt)\n")
    if command[0] == "eval":
        assert f"checkpoint.resume={used.resolve()}" in launched[0]
    elif command[0] in ("export", "checkpoint"):
        assert f"from {used}" in captured.out
