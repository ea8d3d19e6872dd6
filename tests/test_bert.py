"""Issue 27: BERT, RoBERTa and Megatron-BERT equal transformers' masked-LM models (logits, loss and
gradients), and the trip transformers -> Parallax -> transformers is bitwise. One process, TP=1; the layouts are in the scenarios."""
import pytest
import torch
import transformers

from models.config import ModelConfig
from models.huggingface import twin_for

VOCAB = 256  # a multiple of model.vocab_multiple: no padded rows, so the losses compare too
HF_TOL = 1e-5
FAMILY = {  # twin: (norm_placement, position_offset, type_vocab_size)
    "BERT": ("post", 0, 2),
    "RoBERTa": ("post", 2, 1),
    "Megatron-BERT": ("pre", 0, 2),
}


def encoder_config(placement: str, offset: int, types: int) -> ModelConfig:
    return ModelConfig(arch="bert", num_layers=2, hidden_size=32, num_heads=4, ffn_hidden_size=48, max_seq_len=24,
                       norm_eps=1e-12, norm_placement=placement, position_offset=offset, type_vocab_size=types)


def ours_and_state(cfg: ModelConfig, ids, labels, token_type_ids):
    """Our logits (true vocabulary), loss and gradients, and the weights, norms and biases nudged off their
    initial values so that a mapping that dropped one would show."""
    from models.bert import BERT
    from parallel.topology import single_process_world

    with single_process_world():
        torch.manual_seed(3)
        model = BERT(cfg, VOCAB).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
            logits = model(ids, token_type_ids=token_type_ids).transpose(0, 1)[..., :VOCAB]
        loss = model(ids, labels, token_type_ids=token_type_ids)
        loss.backward()
        return (logits, loss.item(), {name: p.detach().clone() for name, p in model.named_parameters()},
                {name: p.grad for name, p in model.named_parameters()})


@pytest.mark.parametrize("name", FAMILY)
def test_logits_loss_and_grads_equal_transformers_and_the_round_trip_is_bitwise(name):
    cfg = encoder_config(*FAMILY[name])
    twin = twin_for(cfg)
    assert twin.NAME == name
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    labels = torch.where(torch.rand(2, 20, generator=g) < 0.3, ids, -100)
    token_type_ids = torch.randint(0, cfg.token_types, (2, 20), generator=g)
    ours, loss, state, grads = ours_and_state(cfg, ids, labels, token_type_ids)

    special = {"eos": None, "bos": None, "pad": max(cfg.first_position - 1, 0)}
    hf = transformers.AutoModelForMaskedLM.from_config(twin.hf_config(cfg, VOCAB, special)).eval()
    result = hf.load_state_dict(twin.to_hf(state, cfg, VOCAB), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == [f"{twin.head[3]}.weight"]  # tied to the embedding
    hf.tie_weights()
    theirs = hf(input_ids=ids, token_type_ids=token_type_ids, labels=labels)
    torch.testing.assert_close(ours, theirs.logits.detach(), atol=HF_TOL, rtol=0)
    assert loss == pytest.approx(theirs.loss.item(), abs=HF_TOL)
    theirs.loss.backward()  # the gradients too: the head scores only the masked positions, transformers all of them
    their_grads = {name: p.grad for name, p in hf.named_parameters(remove_duplicate=False)}  # tied ones too
    for name, grad in twin.to_hf(grads, cfg, VOCAB).items():
        torch.testing.assert_close(grad, their_grads[name], atol=HF_TOL, rtol=0, msg=name)

    back = twin.from_hf(hf.state_dict(), cfg, cfg.padded_vocab_size(VOCAB))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert twin.model_config(hf.config) == cfg.model_copy(update={"vocab_size": VOCAB})


def test_a_config_with_no_exact_twin_is_refused_naming_the_field():
    from models.huggingface import HuggingFaceError

    with pytest.raises(HuggingFaceError, match="model.type_vocab_size=0"):
        twin_for(encoder_config("post", 0, 0))


EVAL_LAYOUTS = {"tp2-sp": ["--nproc", "2", "parallel.tp=2", "parallel.sequence_parallel=true"],
                "dp2-zero3": ["--nproc", "2", "parallel.zero_stage=3", "train.micro_batch_size=4"]}  # the run's 8, over 2


def test_masked_lm_evaluation_gives_the_same_loss_and_accuracy_at_every_layout(tmp_path):
    """Issue 27 point 4: the evaluation mask is fixed per held-out window, so one checkpoint's masked-LM loss and
    masked-token accuracy are the same at TP=2 with sequence parallelism and at DP=2 under ZeRO-3 as on one
    process (1e-5), and the run's log shows the accuracy."""
    import json

    from launcher.cli import main

    run = tmp_path / "run"
    main(["train", "configs/bert-tiny.yaml", "train.steps=30", "train.micro_batch_size=8", "train.eval_interval=30",
          "train.eval_batches=2", f"logging.run_dir={run}"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [record for record in logged if "eval_loss" in record]
    assert [r["step"] for r in evaluations] == [0, 30]
    assert 0 < evaluations[-1]["eval_accuracy"] < 1
    assert evaluations[-1]["eval_accuracy"] > evaluations[0]["eval_accuracy"], "30 steps must learn something"

    results = {}
    for name, extra in {"one": [], **EVAL_LAYOUTS}.items():
        out = tmp_path / f"{name}.json"
        main(["eval", str(run), "--out", str(out), *extra])
        results[name] = json.loads(out.read_text())
    one = results.pop("one")
    assert one["eval_tokens"] > 100
    for name, result in results.items():
        assert result["eval_tokens"] == one["eval_tokens"], name
        assert result["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5), name
        assert result["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1e-5), name


def test_masked_token_accuracy_takes_the_argmax_over_the_whole_vocabulary_at_tp2(scenario_results):
    """A label that is the largest logit on its own rank's half of the vocabulary, but not overall, is wrong."""
    result = scenario_results("masked_accuracy_tp2")
    assert result["correct_by_rank"] == [result["expected"]] * 2
