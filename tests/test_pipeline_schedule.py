"""The pipeline schedules, checked without processes: every rank's action list runs to the end against
the others' (sends never wait; a rank waits only for what it receives), every micro-batch goes forward
then backward through every chunk, and the warm-up holds no more micro-batches in flight than 1F1B and
the interleaved schedule promise."""
import pytest

from parallel.pipeline.schedule import Action, forward_only, one_f_one_b, virtual_stage


def run_all(pp: int, v: int, m: int, schedule=one_f_one_b) -> list[list[Action]]:
    """Execute every rank's schedule in lock-free rounds; fail on a deadlock. Returns the order each
    rank ran its actions in (which is its list: a rank never reorders)."""
    lists = [schedule(pp, v, m, rank) for rank in range(pp)]
    position = [0] * pp
    done: set[tuple[str, int, int]] = set()  # (kind, micro-batch, virtual stage)
    last = pp * v - 1
    while any(position[r] < len(lists[r]) for r in range(pp)):
        progressed = False
        for rank in range(pp):
            if position[rank] == len(lists[rank]):
                continue
            a = lists[rank][position[rank]]
            stage = virtual_stage(a.chunk, rank, pp)
            if a.kind == "forward":
                ready = stage == 0 or ("forward", a.micro_batch, stage - 1) in done
            else:
                ready = ("forward", a.micro_batch, stage) in done and (
                    stage == last or ("backward", a.micro_batch, stage + 1) in done)
            if ready:
                done.add((a.kind, a.micro_batch, stage))
                position[rank] += 1
                progressed = True
        assert progressed, f"deadlock at pp={pp} v={v} m={m}: positions {position}"
    return lists


@pytest.mark.parametrize("pp,v,m", [(2, 1, 1), (2, 1, 4), (4, 1, 2), (4, 1, 8), (3, 1, 5),
                                    (2, 2, 2), (2, 2, 4), (4, 2, 8), (4, 3, 4), (2, 4, 6)])
def test_every_rank_runs_every_micro_batch_forward_then_backward_through_each_chunk(pp, v, m):
    for rank, actions in enumerate(run_all(pp, v, m)):
        for kind in ("forward", "backward"):
            ran = sorted((a.micro_batch, a.chunk) for a in actions if a.kind == kind)
            assert ran == [(mb, c) for mb in range(m) for c in range(v)], f"rank {rank} {kind}"
        order = {(a.kind, a.micro_batch, a.chunk): i for i, a in enumerate(actions)}
        assert all(order["forward", mb, c] < order["backward", mb, c] for mb in range(m) for c in range(v))


def in_flight(actions: list[Action]) -> int:
    """The most forwards whose backward has not yet run: the activations a rank holds at its peak."""
    held = peak = 0
    for a in actions:
        held += 1 if a.kind == "forward" else -1
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("pp,m", [(2, 8), (4, 8), (4, 2)])
def test_1f1b_holds_at_most_pp_minus_rank_micro_batches(pp, m):
    """The point of 1F1B over GPipe: rank r holds min(pp - r, m) micro-batches' activations, not m."""
    for rank in range(pp):
        assert in_flight(one_f_one_b(pp, 1, m, rank)) == min(pp - rank, m)


def test_interleaved_first_rank_warms_up_every_chunk():
    """Rank 0 at pp=4, v=2: 2 x 3 + 1 x 4 = 10 forwards before its first backward, as Megatron's schedule."""
    actions = one_f_one_b(4, 2, 8, rank=0)
    first_backward = next(i for i, a in enumerate(actions) if a.kind == "backward")
    assert first_backward == 10 + 1  # the warm-up, then the steady state's first forward
    assert actions[:4] == [Action("forward", mb, 0) for mb in range(4)]
    assert actions[4:8] == [Action("forward", mb, 1) for mb in range(4)]


def test_forward_only_runs_each_micro_batch_once_per_chunk_without_deadlock():
    for rank, actions in enumerate(run_all(4, 2, 4, schedule=forward_only)):
        assert sorted((a.micro_batch, a.chunk) for a in actions) == [(mb, c) for mb in range(4) for c in range(2)]


def test_a_schedule_that_cannot_run_is_caught():
    """The simulator itself can fail: a rank that runs a backward before its forward deadlocks."""
    def backward_first(pp, v, m, rank):
        actions = one_f_one_b(pp, v, m, rank)
        return actions[::-1] if rank == pp - 1 else actions
    with pytest.raises(AssertionError, match="deadlock"):
        run_all(2, 1, 2, schedule=backward_first)


def test_forward_only_takes_any_number_of_micro_batches():
    """Evaluation's last group of micro-batches may be shorter than pp, even with virtual stages."""
    for rank, actions in enumerate(run_all(4, 2, 6, schedule=forward_only)):
        assert sorted((a.micro_batch, a.chunk) for a in actions) == [(mb, c) for mb in range(6) for c in range(2)]
