"""Model definitions built from megatron-core tensor-parallel layers; they know nothing of launchers or engines.

`build_model` picks the class that `model.arch` names; it imports megatron-core only when called,
so reading a config does not pay for it.
"""


def build_model(cfg, vocab_size: int, **options):
    """A models.gpt.GPT or models.t5.T5 for `cfg` (a ModelConfig); options: sequence_parallel,
    activation_checkpointing, expert_parallel_size. Both take the same options and expose the same
    training interface: batch_inputs(batch), forward(**inputs) -> loss, parameter_counts(), moe_metrics()."""
    if cfg.arch == "t5":
        from models.t5 import T5
        return T5(cfg, vocab_size, **options)
    from models.gpt import GPT
    return GPT(cfg, vocab_size, **options)
