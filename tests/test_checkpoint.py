"""Issue 4, points 4 and 5: exact resume at one layout, resharding onto another with no offline step,
for the model, its optimizer and the data pipeline.

The runs are real ranks on gloo under the real DeepSpeed engine (tests/distributed/scenarios_checkpoint.py);
the checkpoints are real files, read back here without any of the code that wrote them.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline import EOD
from tests.data.corpora import doc_length, token_counts
from tests.distributed.scenarios_checkpoint import ID_DOCS_PER_SHARD, ID_SHARDS, SAVED_AT, STEPS, read_full_tensors

REPO = Path(__file__).resolve().parents[1]

LOSS_CURVE_TOL = 1e-4


@pytest.mark.parametrize("name", [
    "exact_resume_dp2_zero0", "exact_resume_dp2_zero1", "exact_resume_dp2_zero2", "exact_resume_dp2_zero3",
    "exact_resume_dp2_zero0_bf16", "exact_resume_dp2_zero1_bf16", "exact_resume_tp2", "exact_resume_tp2_zero3",
    "exact_resume_ep2",
])
def test_resumed_losses_are_bitwise_equal(scenario_results, name):
    runs = scenario_results(name)
    straight, resumed = runs["straight"], runs["resumed"]
    assert [r["step"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["step"] for r in resumed] == list(range(SAVED_AT + 1, STEPS + 1)), "resume must continue after step 10"
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[SAVED_AT:]]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in straight[SAVED_AT:]]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight[SAVED_AT:]]


@pytest.mark.parametrize("name,uninterrupted", [
    ("reshard_tp2_to_tp1", "exact_resume_tp2"),
    ("reshard_tp2_zero3_to_dp2_zero1", "exact_resume_tp2_zero3"),
    ("reshard_tp1_to_tp2", "exact_resume_dp2_zero1"),
    ("reshard_ep2_to_ep1", "exact_resume_ep2"),
    ("reshard_dp2_to_dp1_zero1", "exact_resume_dp2_zero1"),
    ("reshard_dp2_to_dp1_zero2", "exact_resume_dp2_zero2"),
    ("reshard_dp2_to_dp1_zero3", "exact_resume_dp2_zero3"),
    ("reshard_dp2_to_dp4_zero1", "exact_resume_dp2_zero1"),
    ("reshard_dp2_to_dp4_zero2", "exact_resume_dp2_zero2"),
    ("reshard_dp2_to_dp4_zero3", "exact_resume_dp2_zero3"),
])
def test_reshard_keeps_weights_and_moments_and_continues_the_curve(scenario_results, name, uninterrupted):
    """The reload at the new layout holds exactly the saved tensors, and steps 11-20 from it follow the
    uninterrupted run of the saving layout (the global batches are the same; only summation order differs)."""
    assert_reload_is_the_checkpoint(scenario_results(name), scenario_results(uninterrupted)["straight"][SAVED_AT:])


def assert_reload_is_the_checkpoint(result: dict, reference: list[dict]) -> dict:
    """A reshard scenario's reload holds bitwise the tensors its checkpoint's files hold, moments included, and
    its curve from there follows `reference`, the uninterrupted run's records after the save; returns the saved
    tensors."""
    saved = read_full_tensors(Path(result["checkpoint"]))
    reloaded = result["tensors"]
    assert reloaded.keys() == saved.keys() and len(saved) > 0
    for param, tensors in saved.items():
        assert tensors["exp_avg_sq"].abs().sum() > 0, f"{param}: the saved moments must be real"
        for key, value in tensors.items():
            assert torch.equal(reloaded[param][key], value), f"{param} {key} changed in the reload"
    curve = result["curve"]
    assert [r["step"] for r in curve] == [r["step"] for r in reference]
    for ref, got in zip(reference, curve):
        assert abs(got["loss"] - ref["loss"]) <= LOSS_CURVE_TOL, f"step {ref['step']}: {got['loss']} vs {ref['loss']}"
    return saved


def test_the_data_pipeline_reads_every_document_once_across_a_dp_reshard(scenario_results):
    """The real loader through real checkpoints: 4 steps at DP=2, saved; resumed at DP=1 for 2 steps
    and read to the end of the epoch. Every token names its document, so a document read twice or
    skipped changes its count (tests/data/test_reshard.py shows the count catches a re-read)."""
    before, after = scenario_results("data_dp2_until_saved"), scenario_results("data_dp2_resumed_at_dp1")
    assert len(before["batches"]) == 4 * 2 and after["trained"] == 2  # steps x DP ranks, one micro-batch each
    counts = token_counts(before["batches"] + after["batches"], Path(before["tokenizer"]))
    lengths = {f"d{i}": doc_length(i) for i in range(ID_SHARDS * ID_DOCS_PER_SHARD)}
    assert {word: counts[word] for word in lengths} == lengths
    assert counts[EOD] == len(lengths)


def test_a_resuming_rank_reads_only_the_loader_states_it_needs(scenario_results):
    """Issue 17: each DP rank saves its loader state (shuffle buffers of text) in a file of its own. At
    the saved layout a rank reads only its own; at another DP size, every old rank's, to reshard them."""
    def loader_files(reads):
        return sorted(name for name in reads if name.startswith("data-"))

    same = scenario_results("data_dp2_resumed_at_dp2")
    assert same["trained"] == 2
    assert [loader_files(reads) for reads in same["reads"]] == [["data-00000.pt"], ["data-00001.pt"]]
    assert loader_files(scenario_results("data_dp2_resumed_at_dp1")["reads"]) == ["data-00000.pt", "data-00001.pt"]


def test_a_load_at_the_saved_layout_reads_only_what_the_rank_keeps(scenario_results):
    """Issue 17: at the saved layout a rank reads its own shard's bytes and no more, at most 1.05x (it is
    1.00x), verification included: every byte a rank reads of the shard files counts, to load it or to
    check it against a checksum. ZeRO-3 keeps only its partition of every tensor. ZeRO-1 keeps only its
    partition of the fp32 master and the moments; the weight every rank holds whole is all-gathered from
    the masters over DP as after a step. Before, ZeRO-1 read the whole weight on every rank: 4/3 of its own at DP=2 (and
    before that, every rank read the whole checkpoint, twice its own)."""
    result = scenario_results("tensor_reads_at_the_saved_layout")
    for zero in ("zero1", "zero3"):
        assert all(read <= 1.05 * own for read, own in zip(result[zero]["read"], result[zero]["saved"])), result


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_a_load_at_twice_the_saved_dp_reads_a_quarter_of_the_checkpoint_per_rank(scenario_results, zero):
    """Issue 17: a DP=2 checkpoint loaded at DP=4 costs each rank at most 1.05x a quarter of the
    checkpoint's tensor bytes (the fp32 masters and moments of every shard), counting every byte of the shard
    files it reads to load or to verify them; only metadata is read besides: the pickled index of each
    shard (names, shapes, offsets, block checksums), client.pt, the manifest and the loader-state files.
    Before ZeRO-1/2 restored only their partition of the master, a ZeRO-1 rank read 2x a quarter; while
    verification checked whole shard files, two of the four ranks each read half the checkpoint to check it."""
    result = scenario_results("tensor_reads_at_dp4")[zero]
    quarter = sum(result["saved"]) / 4
    assert len(result["read"]) == 4 and all(read <= 1.05 * quarter for read in result["read"]), (quarter, result)


@pytest.mark.parametrize("change", ["tp1_to_tp2", "tp2_to_tp1"])
def test_a_load_at_another_tp_reads_only_what_the_rank_keeps(scenario_results, change):
    """Issue 17: at another TP size a rank fills its TP slice (and in it its ZeRO partition) from the
    parts of the saved TP ranks' fragments that overlap it, with no full tensor built: it reads at most
    1.05x the fp32 bytes it keeps (a DP share of its TP rank's masters and moments), verification reads
    included. TP=1 -> TP=2 at DP=1 keeps the whole slice; TP=2 -> TP=1 at DP=2, half the model. Before, a
    TP change assembled every TP-split tensor whole on every rank."""
    result = scenario_results("tensor_reads_at_another_tp")[change]
    assert all(read <= 1.05 * keeps for read, keeps in zip(result["read"], result["keeps"])), result


def test_any_tp_slice_and_flat_range_is_filled_from_any_fragments_and_checked_as_it_is_read():
    """The arithmetic behind a load at another TP size, beyond the tiny model's shapes: random tensors
    cut along each partition_dim over 1, 2 or 4 saved TP ranks into randomly cut flat fragments,
    checksummed in blocks of random size as a save does, then read back as any flat range of any TP
    rank's slice (1, 2 or 4 ranks): exactly the saved numbers of that range. The bytes read are those of
    the blocks it checked: all it copied, and less than two blocks besides in each saved TP slice it read
    from (one at each end of the range; reading a whole tensor, nothing besides). One number changed in a
    fragment, and a read that takes it names that fragment's file."""
    import math
    import random

    from parallel.checkpoint.checksums import add_block_checksums
    from parallel.checkpoint.layout_free import SavedTensors

    rng = random.Random(0)
    for _ in range(1000):
        shape = [rng.randint(1, 5) for _ in range(rng.randint(1, 3))]
        dim, saved_tp, tp = rng.randrange(len(shape)), rng.choice([1, 2, 4]), rng.choice([1, 2, 4])
        shape[dim] = math.lcm(saved_tp, tp) * rng.randint(1, 3)
        block_bytes = 4 * rng.choice([1, 3, 8, 64])
        full = torch.randn(shape)
        shards = {}
        for saved_rank, part in enumerate(full.chunk(saved_tp, dim)):
            flat = part.flatten()
            ends = range(flat.numel() + 1)
            cuts = sorted({0, flat.numel(), *rng.sample(ends, min(len(ends), rng.randint(0, 4)))})
            for a, b in zip(cuts, cuts[1:]):
                pieces = {"w": {"tp_rank": saved_rank, "tp_size": saved_tp, "dim": dim, "shape": list(part.shape),
                                "start": a, **{key: flat[a:b].clone() for key in ("param", "exp_avg", "exp_avg_sq")}}}
                add_block_checksums(pieces, block_bytes)
                shards[f"shard-{len(shards):05d}.pt"] = {"pieces": pieces}
        shards = dict(rng.sample(list(shards.items()), len(shards)))
        saved = SavedTensors(Path("checkpoint"), shards)
        assert torch.equal(saved.full("w", "param"), full)
        assert saved.bytes_read == 4 * full.numel() and saved.problem is None
        tp_rank = rng.randrange(tp)
        tp_shape = list(full.chunk(tp, dim)[tp_rank].shape)
        mine = full.chunk(tp, dim)[tp_rank].flatten()
        lo = rng.randint(0, mine.numel())
        hi = rng.randint(lo, mine.numel())
        read_before = saved.bytes_read
        got = saved.fill("w", "param", tp_shape, dim, tp, tp_rank, (lo, hi))
        assert torch.equal(got, mine[lo:hi])
        saved_slices_read = max(1, saved_tp // tp)
        assert 4 * (hi - lo) <= saved.bytes_read - read_before < 4 * (hi - lo) + 2 * block_bytes * saved_slices_read

        file, shard = rng.choice(list(shards.items()))
        damaged = shard["pieces"]["w"]["exp_avg"]
        damaged[rng.randrange(damaged.numel())] += 1
        saved = SavedTensors(Path("checkpoint"), shards)
        if not torch.equal(saved.fill("w", "exp_avg", tp_shape, dim, tp, tp_rank, (lo, hi)), mine[lo:hi]):
            assert saved.problem == f"{Path('checkpoint') / file}: w (exp_avg) does not match its block checksums " \
                                   "(altered or corrupt)"


def test_before_a_resume_each_rank_checks_whole_only_small_files_and_its_shards_by_size(scenario_results):
    """Issue 17: before anything is loaded, each file other than a shard is checked whole against the manifest
    by one rank, a DP rank's loader state by the rank that reads it. A shard is checked only by size, by the
    ranks that load from it, which check each block of it they read against its block checksum: at the
    saved layout (DP=4, ZeRO-1) that is a rank's own shard alone, the only one it opens. Before, each rank
    read its own shard whole for its checksum (and before that, shard (r + 2) mod 4 as well)."""
    result = scenario_results("verification_at_the_saved_layout")
    checked = result["checked"]
    for rank, files in enumerate(checked):
        assert [f for f in files["whole"] if f.startswith(("shard-", "data-"))] == [f"data-{rank:05d}.pt"], checked
        assert files["size"] == [f"shard-{rank:05d}.pt"], checked
    small = [name for name in result["files"] if not name.startswith("shard-")]
    assert sorted(f for files in checked for f in files["whole"]) == small, checked


def test_a_resume_at_another_layout_finds_damage_in_what_it_reads_and_falls_back_together(scenario_results):
    """A bit flipped in the middle of a fragment of step 20's shard 1 (DP=2), resumed at DP=4 with
    resume=auto: the ranks that read that fragment find it as they load, every rank falls back to step 10
    together, rank 0 says so in one line naming the file, and the engine holds exactly step 10's numbers
    (the full load of step 10 overwrote what step 20's had written)."""
    auto = scenario_results("damaged_checkpoints_at_another_layout")["values_auto"]
    damaged = Path(auto["root"]) / f"step-{STEPS:08d}" / "shard-00001.pt"
    assert auto["outcomes"] == [SAVED_AT] * 4, auto["outcomes"]
    warnings = [line for lines in auto["printed"] for line in lines if "skipping" in line]
    assert len(warnings) == 1 and warnings == [line for line in auto["printed"][0] if "skipping" in line], warnings
    assert warnings[0].startswith(f"parallax: warning: skipping checkpoint step-{STEPS:08d}: {damaged}: "), warnings
    assert warnings[0].endswith("does not match its block checksums (altered or corrupt)"), warnings
    saved = read_full_tensors(Path(auto["root"]) / f"step-{SAVED_AT:08d}")
    assert auto["tensors"].keys() == saved.keys()
    for name, tensors in saved.items():
        assert all(torch.equal(auto["tensors"][name][key], value) for key, value in tensors.items()), name


@pytest.mark.parametrize("case,file,what", [
    ("values_path_tp2", "shard-00001.pt", r": .* does not match its block checksums \(altered or corrupt\)"),
    ("index_path", "shard-00000.pt", r": its index \(names, offsets, checksums\) does not match its checksum in the "
                                     r"manifest \(altered or corrupt\)"),
])
def test_a_resume_refuses_a_damaged_checkpoint_it_is_given_in_one_line_on_every_rank(scenario_results, case, file,
                                                                                     what):
    """Step 20 named as the checkpoint to resume, damaged: a bit of a fragment's values, found by the ranks
    that read it at TP=2 DP=2; a bit of the first piece's offset in shard 0's pickled index, which still
    loads, found by the index's checksum in the manifest before any fragment is read (at DP=4 every rank
    opens every shard). Every rank raises the same one line naming the file, which the CLI prints as its
    error, exiting non-zero."""
    import re

    result = scenario_results("damaged_checkpoints_at_another_layout")[case]
    damaged = Path(result["root"]) / f"step-{STEPS:08d}" / file
    assert len(result["outcomes"]) == 4 and len(set(result["outcomes"])) == 1, result["outcomes"]
    line = result["outcomes"][0]
    assert isinstance(line, str), f"every rank resumed, at step {line}"
    assert re.fullmatch(f"cannot resume: {re.escape(str(damaged))}{what}; pass another checkpoint or --resume auto",
                        line), line


def test_resume_auto_stops_in_one_line_when_its_only_checkpoint_is_found_damaged_while_loading(scenario_results):
    """Step 20 alone, a bit of its fragment flipped, resumed at DP=4 with resume=auto: its load has written
    into the engine before the damage showed, and with no older checkpoint left the engine is neither the
    checkpoint nor the model the run built. Every rank stops with the same line, after the warning."""
    alone = scenario_results("damaged_checkpoints_at_another_layout")["values_auto_alone"]
    damaged = Path(alone["root"]) / f"step-{STEPS:08d}" / "shard-00001.pt"
    assert len(set(alone["outcomes"])) == 1 and isinstance(alone["outcomes"][0], str), alone["outcomes"]
    assert alone["outcomes"][0].startswith(f"cannot resume: {damaged}: "), alone["outcomes"]
    assert alone["outcomes"][0].endswith(f"(altered or corrupt), and no older checkpoint under {alone['root']} is "
                                         "usable; relaunch with --resume none to start afresh"), alone["outcomes"]
    assert sum("skipping checkpoint" in line for line in alone["printed"][0]) == 1, alone["printed"]


def test_a_save_copies_into_the_host_memory_of_the_save_before(scenario_results):
    """The loop is blocked while a save copies the rank's fragments to the host. Into fresh memory, every page
    faulted in: bench/checkpoint.py's loop was blocked 0.012-0.045 s a save (median 0.042 s, against a
    0.05 s target); into the previous save's buffers 0.012-0.016 s. Reused, they must still hold the new
    step's numbers, which the optimizer step between the saves changed."""
    copies = scenario_results("host_copies_of_two_saves")
    assert copies["copies"] > 0 and copies["same_memory"] == copies["copies"], copies
    assert copies["second_is_its_step"] and copies["steps_differ"] > 0, copies


def test_control_traffic_never_touches_the_data_plane(scenario_results):
    """Issue 14: on GPUs the data-plane groups are NCCL, which refuses CPU tensors and pickles, so the
    stop vote, barriers and object gathers go over the gloo control groups. Counted from the groups'
    own sequence numbers on a real DP=2 run: saving every step, stopping and resuming add
    collectives to the control groups only (a save's to the save group, which only its background
    thread uses); the default group carries none at ZeRO-1, and the TP and DP groups carry exactly
    what a run that saves once carries (the model's own traffic), but for the one tensor transfer a
    resume makes: since no rank reads the whole weights (issue 17), DeepSpeed all-gathers them over DP
    from the restored fp32 partitions, one all-gather per ZeRO parameter group (the tiny GPT has two,
    with and without weight decay), as after every step."""
    runs = scenario_results("control_plane")
    end, stopped, resumed = runs["saved_at_end"], runs["stopped"], runs["resumed"]
    assert {end["backend"], stopped["backend"], resumed["backend"]} == {"gloo"}
    for run in (end, stopped, resumed):
        assert run["collectives"]["default"] == 0, run
        assert run["collectives"]["control"] > 0 and run["collectives"]["save"] > 0, run
    assert end["resume"] is None and stopped["resume"] is None, runs
    resume = {group: resumed["resume"][group] for group in ("default", "tp", "dp")}
    assert resume == {"default": 0, "tp": 0, "dp": 2}, runs
    for group in ("tp", "dp"):
        after_resume = resumed["collectives"][group] - resumed["resume"][group]
        assert stopped["collectives"][group] + after_resume == end["collectives"][group], runs
    assert stopped["collectives"]["control"] + resumed["collectives"]["control"] > end["collectives"]["control"]
    assert stopped["collectives"]["save"] + resumed["collectives"]["save"] > end["collectives"]["save"]


def test_setup_cfg_pins_the_deepspeed_the_checkpoint_adapter_is_tested_against():
    """The adapter refuses any other DeepSpeed; a pin that drifted from it would install one it refuses."""
    import configparser

    from parallel.checkpoint.deepspeed_adapter import TESTED_DEEPSPEED

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    pins = [line for line in setup["options"]["install_requires"].splitlines() if line.startswith("deepspeed")]
    assert pins == [f"deepspeed=={TESTED_DEEPSPEED}"]


def test_a_deepspeed_other_than_the_tested_one_is_refused_in_one_line(monkeypatch):
    import deepspeed

    from parallel.checkpoint import CheckpointError
    from parallel.checkpoint.deepspeed_adapter import check_deepspeed_version

    check_deepspeed_version()
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(CheckpointError, match=r"DeepSpeed 0\.20\.0 is installed; pip install deepspeed==") as refused:
        check_deepspeed_version()
    assert "\n" not in str(refused.value)


def test_a_prune_begun_by_the_background_save_finishes_before_the_rank_exits(tmp_path):
    """The save thread is a daemon (a rank that fails mid-save must not wait on gone peers), and a thread
    inherits that flag: the deletion it started died with the process, and its half-deleted
    `.step-*.pruned.tmp` stayed beside the checkpoints (seen once in the suite)."""
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        for i in range(3000):  # enough files that deleting them outlasts the process's exit
            (root / f"step-{step:08d}" / f"file-{i // 100}" / f"{i}").parent.mkdir(parents=True, exist_ok=True)
            (root / f"step-{step:08d}" / f"file-{i // 100}" / f"{i}").write_bytes(b"x")
    probe = f"""
import threading
from pathlib import Path
from parallel.checkpoint import storage
saver = threading.Thread(target=storage.prune, args=(Path({str(root)!r}), 1), daemon=True)
saver.start()
saver.join()
"""
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000020"]
