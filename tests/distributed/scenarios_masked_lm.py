"""Issue 27's masked-token accuracy under TP: each rank holds half the vocabulary's logits (see harness.py)."""
import torch

from tests.distributed.harness import scenario

VOCAB, POSITIONS, BATCH = 64, 12, 3


def logits_and_labels():
    """Whole-vocabulary logits [s, b, V] and labels [b, s]: a third are the argmax (right), a third the largest
    of the second half of the vocabulary without being the argmax (right only on that half's rank: wrong), and a
    third not scored."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(POSITIONS, BATCH, VOCAB, generator=g)
    logits[..., : VOCAB // 2] += 1.0  # the overall argmax is in the first half
    best, best_of_second_half = logits.argmax(-1), logits[..., VOCAB // 2:].argmax(-1) + VOCAB // 2
    kind = torch.arange(POSITIONS * BATCH).reshape(POSITIONS, BATCH) % 3
    labels = torch.where(kind == 0, best, torch.where(kind == 1, best_of_second_half, -100))
    return logits, labels.transpose(0, 1).contiguous()


@scenario(world_size=2)
def masked_accuracy_tp2():
    """How many labels vocab_parallel_correct finds right on each of 2 TP ranks, each holding half the
    vocabulary, and how many the argmax of the whole logits gets right."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from models.blocks import vocab_parallel_correct
    from parallel.topology import init_topology

    init_topology(tp=2)
    logits, labels = logits_and_labels()
    mine = logits.chunk(2, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
    scored = labels != -100
    expected = ((logits.argmax(-1).transpose(0, 1) == labels) & scored).sum()
    assert 0 < expected < scored.sum()
    correct = [None, None]
    dist.all_gather_object(correct, int(vocab_parallel_correct(mine, labels)))
    return {"correct_by_rank": correct, "expected": int(expected)}
