"""Issue 4's distributed scenarios: exact resume at one layout, and resharding onto another.

Every run trains the parity scenarios' tiny GPT on the same global batches for 20 steps. A DP=2
run saves at step 10 and 20 under $PARALLAX_SCENARIO_DIR; the other layouts (TP=2, DP=1, DP=4, in
this world-size launch or a later one) reload its step-10 checkpoint and continue.
"""
import contextlib
import io
import math
import os
import pickletools
import shutil
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import scenarios_t5 as t5
from tests.distributed.harness import scenario
from tests.distributed.scenarios import GLOBAL_BATCH, VOCAB, fixed_batches, full_shape, tiny_config, train_records
from tests.distributed.scenarios_moe import MOE

STEPS, SAVED_AT = 20, 10
# The tiny model's fragments are a few KB, so its checksum blocks are small: a load reads less than a
# block more than it needs at each end of a range, and the read-count tests allow 5% over.
CHECKSUM_BLOCK_BYTES = 1024


class ResumableBatches:
    """The parity scenarios' fixed global batches (the GPT's, or `source`'s) behind the data loader's
    checkpoint interface.

    Its state is the number of global steps drawn, which means the same thing at every DP size.
    """

    def __init__(self, cfg, topo, source=None):
        self.cfg, self.topo, self.steps_drawn = cfg, topo, 0
        self.source = source or fixed_batches(cfg)

    def __iter__(self):
        accum = self.cfg.train.grad_accum
        for i, batch in enumerate(self.source(self.topo)):
            if i >= self.steps_drawn * accum:
                if (i + 1) % accum == 0:  # counted before the yield: the loop saves before asking for more
                    self.steps_drawn += 1
                yield batch

    def state_dict(self) -> dict:
        return {"dp_rank": self.topo.dp_rank, "steps_drawn": self.steps_drawn}

    def load_state_dict(self, states) -> None:
        """Like the real loader: at the same DP size it asks only for its own state, at another for every one."""
        if len(states) == self.topo.dp:
            asked = {self.topo.dp_rank: states[self.topo.dp_rank]}
        else:
            asked = dict(enumerate(states))
        assert asked and all(s["dp_rank"] == r for r, s in asked.items()), "old DP rank r's state at index r"
        self.steps_drawn = next(iter(asked.values()))["steps_drawn"]


def run_dir(name: str) -> Path:
    return Path(os.environ["PARALLAX_SCENARIO_DIR"]) / "checkpoint-runs" / name


def layout(tp: int, dp: int, zero: int) -> tuple[str, ...]:
    return (f"parallel.tp={tp}", f"train.micro_batch_size={GLOBAL_BATCH // dp}", f"parallel.zero_stage={zero}")


def train_run(name: str, *overrides: str) -> list[dict]:
    cfg = tiny_config(f"train.steps={STEPS}", f"checkpoint.interval={SAVED_AT}", f"logging.run_dir={run_dir(name)}",
                      f"checkpoint.checksum_block_bytes={CHECKSUM_BLOCK_BYTES}", *overrides)
    return train_records(cfg, batches=lambda topo: ResumableBatches(cfg, topo))


def saved_path(name: str, step: int = SAVED_AT) -> Path:
    return run_dir(name) / "checkpoints" / f"step-{step:08d}"


def saved(name: str) -> str:
    return f"checkpoint.resume={saved_path(name)}"


def straight_and_resumed(name: str, *layout_overrides: str) -> dict:
    """20 steps straight (saving at step 10), then the same layout again from that step-10 checkpoint."""
    straight = train_run(name, "checkpoint.resume=none", *layout_overrides)
    resumed = train_run(f"{name}-resumed", saved(name), *layout_overrides)
    return {"straight": straight, "resumed": resumed}


def reload(source: str, *layout_overrides: str, config=tiny_config, step: int = SAVED_AT):
    """Load `source`'s step-`step` checkpoint at this layout: the engine, the topology and what resume returned.
    `config` builds the run's config from overrides (the tiny GPT's, or another model's: scenarios_bert.py)."""
    from models import build_model
    from parallel.checkpoint import Checkpointer
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    cfg = config(f"train.steps={STEPS}", f"checkpoint.resume={saved_path(source, step)}", *layout_overrides)
    topo = init_topology(tp=cfg.parallel.tp, ep=cfg.parallel.ep)
    # its initial weights are overwritten by the load
    model = build_model(cfg.model, VOCAB, expert_parallel_size=cfg.parallel.ep)
    engine = build_engine(model, cfg, topo)
    resumed = Checkpointer(cfg, topo, engine, ResumableBatches(cfg, topo)).resume()
    return engine, topo, resumed


def reloaded_tensors(source: str, *layout_overrides: str, **reload_options) -> dict:
    """Load `source`'s step-10 checkpoint at this layout and gather every full tensor back to rank 0."""
    engine, topo, _ = reload(source, *layout_overrides, **reload_options)
    return {name: {key: full_tensor(engine, topo, param, key) for key in ("param", "exp_avg", "exp_avg_sq")}
            for name, param in engine.module.named_parameters()}


def full_tensor(engine, topo, param, key: str) -> torch.Tensor:
    """What the engine holds of `param` (its fp32 master or an Adam moment), asked of DeepSpeed itself
    and joined over TP: the independent witness of what a reload restored."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from parallel.zero3 import full_shape as tp_local_shape

    value = safe_get_full_fp32_param(param) if key == "param" else safe_get_full_optimizer_state(param, key)
    if value is None:  # ZeRO-0 in fp32: the torch optimizer steps the parameter itself
        value = param.data if key == "param" else engine.optimizer.state[param][key]
    value = value.reshape(tp_local_shape(param))
    return full_shape(param, value, topo.tp_group).detach().clone()


# --- two ranks: exact resume at each layout, and the TP reshards ---------------------------------

@scenario(world_size=2)
def host_copies_of_two_saves():
    """What two saves copy of this rank's fragments (DP=2, ZeRO-1), an optimizer step apart: how many
    bytes, whether the second copies into the first's host memory, and whether it holds its own step's
    numbers (against copies made afresh)."""
    from models.gpt import GPT
    from parallel.checkpoint import fragment_bytes
    from parallel.checkpoint.layout_free import held_pieces
    from parallel.engine import build_engine
    from parallel.topology import init_topology

    cfg = tiny_config(*layout(tp=1, dp=2, zero=1))
    topo = init_topology(tp=1)
    engine = build_engine(GPT(cfg.model, VOCAB), cfg, topo)
    batches = iter(fixed_batches(cfg)(topo))

    def train_one_step():
        tokens = next(batches)
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()

    staging = {}
    train_one_step()
    first = held_pieces(engine, topo, 0, staging)
    first_copies = {(name, key): (piece[key].data_ptr(), piece[key].clone())
                    for name, piece in first.items() for key in ("param", "exp_avg", "exp_avg_sq")}
    train_one_step()
    second = held_pieces(engine, topo, 0, staging)
    afresh = held_pieces(engine, topo, 0, {})
    return {
        "bytes": fragment_bytes({"pieces": second}),
        "copies": len(first_copies),
        "same_memory": sum(second[name][key].data_ptr() == ptr for (name, key), (ptr, _) in first_copies.items()),
        "second_is_its_step": all(torch.equal(second[name][key], afresh[name][key]) for name, key in first_copies),
        "steps_differ": sum(not torch.equal(second[name][key], value) for (name, key), (_, value) in first_copies.items()),
    }


@scenario(world_size=2)
def exact_resume_dp2_zero0():
    return straight_and_resumed("dp2-zero0", *layout(1, 2, 0))


@scenario(world_size=2)
def exact_resume_dp2_zero1():
    return straight_and_resumed("dp2-zero1", *layout(1, 2, 1))


@scenario(world_size=2)
def exact_resume_dp2_zero2():
    return straight_and_resumed("dp2-zero2", *layout(1, 2, 2))


@scenario(world_size=2)
def exact_resume_dp2_zero3():
    return straight_and_resumed("dp2-zero3", *layout(1, 2, 3))


@scenario(world_size=2)
def exact_resume_dp2_zero0_bf16():
    """DeepSpeed's FP16_UnfusedOptimizer: every rank steps whole fp32 copies of the bf16 weights."""
    return straight_and_resumed("dp2-zero0-bf16", "train.precision=bf16", *layout(1, 2, 0))


@scenario(world_size=2)
def exact_resume_dp2_zero1_bf16():
    """ZeRO-1 with bf16 weights: fp32 masters and moments partitioned over DP, whole bf16 weights on each rank."""
    return straight_and_resumed("dp2-zero1-bf16", "train.precision=bf16", *layout(1, 2, 1))


@scenario(world_size=2)
def exact_resume_tp2():
    return straight_and_resumed("tp2-zero1", *layout(2, 1, 1))


@scenario(world_size=2)
def exact_resume_tp2_zero3():
    """ZeRO-3 over TP shards (MT-NLG's layout): each DP rank partitions its TP-local tensors."""
    return straight_and_resumed("tp2-zero3", *layout(2, 1, 3))


@scenario(world_size=2)
def exact_resume_ep2():
    return straight_and_resumed("ep2-zero1", MOE, "parallel.ep=2", *layout(1, 2, 1))


# T5 checkpoints for the export scenarios (scenarios_export.py): the smallest runs that save at each layout.
T5_SAVED_AT = 2


def t5_saved_run(name: str, *overrides: str) -> list[dict]:
    cfg = t5.t5_config(f"train.steps={T5_SAVED_AT}", f"logging.run_dir={run_dir(name)}", "checkpoint.resume=none",
                       *overrides)
    return train_records(cfg, batches=lambda topo: ResumableBatches(cfg, topo, t5.span_corrupted_batches(cfg)))


@scenario(world_size=2)
def t5_1_1_saved_at_tp2():
    return t5_saved_run("t5.1.1-tp2", *t5.T5_V1_1, "parallel.tp=2", "parallel.zero_stage=1")


@scenario(world_size=2)
def t5_saved_at_dp2_zero3():
    return t5_saved_run("t5-dp2-zero3", *t5.T5_V1, f"train.micro_batch_size={t5.GLOBAL_BATCH // 2}",
                        "parallel.zero_stage=3")


def collectives_per_group(name: str, *overrides: str) -> dict:
    """How many collectives each process group carried while a DP=2 ZeRO-1 run resumed, trained,
    voted on stopping, saved and maybe stopped: the difference of its sequence numbers from just
    before the loop's resume to its end; of those, how many the resume itself made, up to the moment
    it hands the loader its states (None if the run did not resume). Also the control group's backend."""
    from launcher.stopping import StopRequested
    from launcher.train import train

    cfg = tiny_config("train.steps=4", "logging.interval=1", f"logging.run_dir={run_dir(name)}", *layout(1, 2, 1),
                      *overrides)
    seen = {}

    def sequence_numbers() -> dict:
        topo = seen["topo"]
        groups = {"default": dist.distributed_c10d._get_default_group(), "tp": topo.tp_group, "dp": topo.dp_group,
                  "control": topo.control_group, "save": topo.save_group}
        return {group: g._get_sequence_number_for_group() for group, g in groups.items()}

    class Batches(ResumableBatches):
        def load_state_dict(self, states) -> None:
            seen["resumed"] = sequence_numbers()
            super().load_state_dict(states)

    def batches(topo):
        seen["topo"] = topo
        seen["before"] = sequence_numbers()
        return Batches(cfg, topo)

    def since_start(now: dict) -> dict:
        return {group: now[group] - seen["before"][group] for group in now}

    try:
        train(cfg, batches=batches)
    except StopRequested:
        pass
    return {"backend": dist.get_backend(seen["topo"].control_group), "collectives": since_start(sequence_numbers()),
            "resume": since_start(seen["resumed"]) if "resumed" in seen else None}


@scenario(world_size=2)
def control_plane():
    """The same 4 steps three ways: saving only at the end; saving every step and stopping after
    step 2; then resuming that run to the end."""
    return {"saved_at_end": collectives_per_group("control-end", "checkpoint.interval=0"),
            "stopped": collectives_per_group("control-every", "checkpoint.interval=1", "train.stop_at_step=2"),
            "resumed": collectives_per_group("control-every", "checkpoint.interval=1")}


def reshard(source: str, *layout_overrides: str) -> dict:
    """Reload `source`'s step-10 checkpoint at another layout: the tensors it holds, and steps 11-20 from it."""
    return {"checkpoint": str(saved_path(source)), "tensors": reloaded_tensors(source, *layout_overrides),
            "curve": train_run(f"{source}-resharded", saved(source), *layout_overrides)}


@scenario(world_size=2)
def reshard_tp2_to_tp1():
    return reshard("tp2-zero1", *layout(1, 2, 1))


@scenario(world_size=2)
def reshard_tp2_zero3_to_dp2_zero1():
    return reshard("tp2-zero3", *layout(1, 2, 1))


@scenario(world_size=2)
def reshard_tp1_to_tp2():
    return reshard("dp2-zero1", *layout(2, 1, 1))


@scenario(world_size=2)
def reshard_ep2_to_ep1():
    """Each EP rank saved its own experts under their global index; at EP=1 every rank holds them all."""
    return reshard("ep2-zero1", MOE, "parallel.ep=1", *layout(1, 2, 1))


def shard_tensor_bytes(source: str) -> list[int]:
    """The bytes of the fp32 fragments (masters and moments) in each shard file of `source`'s step-10
    checkpoint, by the rank that wrote it."""
    from parallel.checkpoint import fragment_bytes, load_shards, read_manifest

    path = saved_path(source)
    return [fragment_bytes(shard) for shard in load_shards(path, read_manifest(path)).values()]


def tensor_bytes_read(source: str, *layout_overrides: str) -> dict:
    """Reload `source`'s step-10 checkpoint at this layout. `read`: per rank, the bytes of the shard files its
    resume read, to load or to verify: the fragment bytes resume counts (Resumed.tensor_bytes_read), plus any
    shard file read whole for its checksum (storage.file_crc is the one whole-file checksum reader); `keeps`:
    per rank, the fp32 bytes (master and two moments) of a DP share of its TP rank's tensors, that is what it
    holds after the load; `saved`: per saving rank, its shard's fragment bytes."""
    from parallel.checkpoint import storage
    from parallel.zero3 import full_shape as tp_local_shape

    checksummed, file_crc = [], storage.file_crc

    def counted(path):
        if Path(path).name.startswith("shard-"):
            checksummed.append(Path(path).stat().st_size)
        return file_crc(path)
    storage.file_crc = counted
    try:
        engine, topo, resumed = reload(source, *layout_overrides)
    finally:
        storage.file_crc = file_crc
    tp_numel = sum(tp_local_shape(param).numel() for param in engine.module.parameters())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (resumed.tensor_bytes_read + sum(checksummed), 3 * 4 * tp_numel / topo.dp))
    return {"read": [read for read, _ in everyone], "keeps": [keeps for _, keeps in everyone],
            "saved": shard_tensor_bytes(source)}


@scenario(world_size=2)
def tensor_reads_at_the_saved_layout():
    return {f"zero{zero}": tensor_bytes_read(f"dp2-zero{zero}", *layout(1, 2, zero)) for zero in (1, 3)}


@scenario(world_size=2)
def tensor_reads_at_another_tp():
    """The TP=1 DP=2 checkpoint reloaded at TP=2 DP=1, and the TP=2 DP=1 one at TP=1 DP=2 (ZeRO-1)."""
    return {"tp1_to_tp2": tensor_bytes_read("dp2-zero1", *layout(2, 1, 1)),
            "tp2_to_tp1": tensor_bytes_read("tp2-zero1", *layout(1, 2, 1))}


# --- one and four ranks: the DP reshards of the DP=2 checkpoints -----------------------------------

def reshard_dp(zero: int, dp: int) -> dict:
    return reshard(f"dp2-zero{zero}", *layout(1, dp, zero))


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero1():
    return reshard_dp(1, 1)


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero2():
    return reshard_dp(2, 1)


@scenario(world_size=1, reads_from=2)
def reshard_dp2_to_dp1_zero3():
    return reshard_dp(3, 1)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero1():
    return reshard_dp(1, 4)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero2():
    return reshard_dp(2, 4)


@scenario(world_size=4, reads_from=2)
def reshard_dp2_to_dp4_zero3():
    return reshard_dp(3, 4)


@scenario(world_size=4, reads_from=2)
def tensor_reads_at_dp4():
    """The DP=2 checkpoints reloaded at DP=4: what each rank read."""
    return {f"zero{zero}": tensor_bytes_read(f"dp2-zero{zero}", *layout(1, 4, zero)) for zero in (1, 2, 3)}


@scenario(world_size=4)
def verification_at_the_saved_layout():
    """A DP=4 run saves at step 10 and resumes there at its own layout: the checkpoint's files, and per rank
    the files its resume checked against the manifest, whole and by size only (storage.verify is the one
    checker)."""
    from parallel.checkpoint import storage

    train_run("dp4-zero1", "checkpoint.resume=none", *layout(1, 4, 1))
    checked, verify = {"whole": [], "size": []}, storage.verify

    def recorded(path, files=None, manifest=None, whole=True):
        checked["whole" if whole else "size"].extend(files or [])
        return verify(path, files, manifest, whole)
    storage.verify = recorded
    try:
        reload("dp4-zero1", *layout(1, 4, 1))
    finally:
        storage.verify = verify
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, checked)
    return {"files": sorted(storage.read_manifest(saved_path("dp4-zero1"))["files"]), "checked": everyone}


def file_offset(shard: Path, record: zipfile.ZipInfo) -> int:
    """Where the bytes of `record` of a torch.save file (a zip of stored records) start in the file."""
    with open(shard, "rb") as f:
        f.seek(record.header_offset)
        header = f.read(30)
    return record.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def flip_a_fragment_bit(shard: Path) -> None:
    """Flip a bit in the middle of the shard's largest tensor: a fragment, in the middle of its values."""
    with zipfile.ZipFile(shard) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    flip_bit(shard, file_offset(shard, record) + record.file_size // 2)


def flip_an_offset_in_the_index(shard: Path) -> None:
    """Flip the low bit of the first piece's `start` in the shard's pickled index: the file still loads, and
    only the index's checksum tells that the offset changed."""
    with zipfile.ZipFile(shard) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("/data.pkl"))
    offset = file_offset(shard, record)  # read it raw: a save skips the zip's own crc32 (storage.save_file)
    ops = list(pickletools.genops(shard.read_bytes()[offset:offset + record.file_size]))
    key = next(i for i, (_, arg, _) in enumerate(ops) if arg == "start")
    _, _, position = next(op for op in ops[key + 1:] if not op[0].name.endswith(("PUT", "MEMOIZE")))
    flip_bit(shard, offset + position + 1)  # the first byte of the number's argument


def resume_damaged(run: str, damage, resume: str, *layout_overrides: str, steps=(SAVED_AT, STEPS)) -> dict:
    """Copy the DP=2 ZeRO-1 run's checkpoints of `steps`, let `damage` alter step 20's, and resume at this layout
    with checkpoint.resume=`resume` ("auto", or "step-20" for that path). Per rank: the step it resumed at or the
    error it raised, and the lines it printed; with the full tensors the engine then holds."""
    from parallel.checkpoint import CheckpointError
    from parallel.topology import init_topology

    init_topology(tp=1)  # joins the world, if this launch has not yet
    root = run_dir(run) / "checkpoints"
    if dist.get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        for step in steps:
            shutil.copytree(saved_path("dp2-zero1", step), root / f"step-{step:08d}")
        damage(root / f"step-{STEPS:08d}")
    dist.barrier()
    printed, tensors = io.StringIO(), None
    chosen = root / f"step-{STEPS:08d}" if resume == "step-20" else resume
    try:
        with contextlib.redirect_stdout(printed):
            engine, topo, resumed = reload("dp2-zero1", f"checkpoint.dir={root}", f"checkpoint.resume={chosen}",
                                           *layout_overrides)
        outcome = resumed.step
        tensors = {name: {key: full_tensor(engine, topo, param, key) for key in ("param", "exp_avg", "exp_avg_sq")}
                   for name, param in engine.module.named_parameters()}
    except CheckpointError as e:
        outcome = str(e)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (outcome, printed.getvalue().splitlines()))
    return {"outcomes": [outcome for outcome, _ in everyone], "printed": [lines for _, lines in everyone],
            "tensors": tensors, "root": str(root)}


@scenario(world_size=4, reads_from=2)
def damaged_checkpoints_at_another_layout():
    """Step 20 of the DP=2 ZeRO-1 run, damaged where only a rank reading the damaged bytes can see it, resumed
    at DP=4 and at TP=2 DP=2: a bit of a fragment's values (every rank auto-resuming falls back to step 10; a
    path is refused), a bit of an offset in a shard's index, and a damaged step 20 with no step 10 behind it
    (auto stops: the engine holds part of step 20)."""
    def shard_1_values(step: Path):
        flip_a_fragment_bit(step / "shard-00001.pt")

    def shard_0_index(step: Path):
        flip_an_offset_in_the_index(step / "shard-00000.pt")
    return {"values_auto": resume_damaged("damaged-values", shard_1_values, "auto", *layout(1, 4, 1)),
            "values_path_tp2": resume_damaged("damaged-values", shard_1_values, "step-20", *layout(2, 2, 1)),
            "index_path": resume_damaged("damaged-index", shard_0_index, "step-20", *layout(1, 4, 1)),
            "values_auto_alone": resume_damaged("damaged-alone", shard_1_values, "auto", *layout(1, 4, 1),
                                                steps=(STEPS,))}


def read_full_tensors(path: Path) -> dict:
    """The pytest side: every parameter's full tensors straight from the checkpoint's files, put
    together here from the pieces the ranks wrote (each a flat fragment of one TP slice)."""
    pieces = {}
    for shard in sorted(path.glob("shard-*.pt")):
        for name, piece in torch.load(shard, weights_only=True)["pieces"].items():
            pieces.setdefault(name, []).append(piece)
    full = {}
    for name, parts in pieces.items():
        full[name] = {}
        for key in ("param", "exp_avg", "exp_avg_sq"):
            slices = []
            for tp_rank in range(parts[0]["tp_size"]):
                flat = torch.full((math.prod(parts[0]["shape"]),), float("nan"))
                for p in parts:
                    if p["tp_rank"] == tp_rank:
                        flat[p["start"]:p["start"] + p[key].numel()] = p[key]
                assert not flat.isnan().any(), f"{name} {key}: TP slice {tp_rank} is not fully covered"
                slices.append(flat.view(parts[0]["shape"]))
            full[name][key] = torch.cat(slices, dim=parts[0]["dim"])
    return full


# --- the real data pipeline through a checkpoint: every document once across DP=2 -> DP=1 ---------

ID_SHARDS, ID_DOCS_PER_SHARD = 10, 12


class RecordingLoader:
    """The real per-rank data loader, keeping a copy of every batch it hands out for the count."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch.clone())
            yield batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, states: list[dict]) -> None:
        self.loader.load_state_dict(states)


def id_data_paths() -> tuple[Path, Path]:
    root = Path(os.environ["PARALLAX_SCENARIO_DIR"])
    return root / "id-corpus", root / "id-tokenizer.json"


def recorded_run(name: str, *overrides: str) -> RecordingLoader:
    """Train on the id corpus (one epoch) through the real loader; return this rank's recording, with
    the names of the checkpoint files its resume read whole (storage.load_file) in `reads`."""
    from parallel.checkpoint import storage
    from data_pipeline import build_dataloader
    from launcher.train import train

    corpus, tokenizer = id_data_paths()
    cfg = tiny_config(f"logging.run_dir={run_dir(name)}", f"data.sources=[{{path: {corpus}}}]",
                      f"data.tokenizer={tokenizer}", "data.epochs=1", "data.validation_fraction=0", *overrides)
    recording = []

    def source(topo):
        recording.append(RecordingLoader(build_dataloader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp,
            seed=cfg.train.seed)))
        return recording[0]
    reads, load_file = [], storage.load_file

    def counted(path):
        reads.append(Path(path).name)
        return load_file(path)
    storage.load_file = counted
    try:
        train(cfg, batches=source)
    finally:
        storage.load_file = load_file
    recording[0].reads = reads
    return recording[0]


@scenario(world_size=2)
def data_dp2_until_saved():
    from tests.data.corpora import write_id_corpus, write_id_tokenizer

    corpus, tokenizer = id_data_paths()
    if dist.get_rank() == 0:
        write_id_corpus(corpus, ID_SHARDS, ID_DOCS_PER_SHARD)
        write_id_tokenizer(tokenizer, ID_SHARDS * ID_DOCS_PER_SHARD)
    dist.barrier()
    recording = recorded_run("data-dp2", "train.steps=4", "checkpoint.interval=4", *layout(1, 2, 1))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, recording.batches)
    return {"batches": [batch for batches in everyone for batch in batches], "tokenizer": str(tokenizer)}


@scenario(world_size=2)
def data_dp2_resumed_at_dp2():
    """Resume the DP=2 run's step-4 checkpoint at its own layout for 2 steps: which files each rank read."""
    recording = recorded_run("data-dp2-again", f"checkpoint.resume={run_dir('data-dp2') / 'checkpoints' / 'step-00000004'}",
                             "train.steps=6", "checkpoint.interval=0", *layout(1, 2, 1))
    reads = [None] * dist.get_world_size()
    dist.all_gather_object(reads, recording.reads)
    return {"reads": reads, "trained": len(recording.batches)}


@scenario(world_size=1, reads_from=2)
def data_dp2_resumed_at_dp1():
    """Resume the DP=2 run's step-4 checkpoint on one rank, train 2 steps, then read the epoch to its end."""
    recording = recorded_run("data-dp1", f"checkpoint.resume={run_dir('data-dp2') / 'checkpoints' / 'step-00000004'}",
                             "train.steps=6", *layout(1, 1, 1))
    trained = len(recording.batches)
    list(recording)  # the rest of the epoch
    return {"batches": recording.batches, "trained": trained, "reads": recording.reads}
