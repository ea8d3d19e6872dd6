"""`make gpu-wheels`: everything `bench/gpu/smoke.sh` needs on a bare one-GPU machine, in .gpu/carry/.

The machine the smoke check targets has Python 3.12 with torch (CUDA), transformers and tensorboard,
no network, and receives at most 64 MiB of files besides the source tree. This script, run here with
network, writes what it lacks:

- wheels.tar.xz: CPython 3.12 manylinux x86_64 wheels of every runtime dependency that torch,
  transformers and tensorboard do not bring (CARRIED below), each at the version installed in the
  environment running this script, the one the test suite passes in. pyarrow and pandas, which
  `datasets` imports, are 67 MB of wheels on their own, over the limit, so the wheels travel
  uncompressed inside one xz tarball, a third smaller than the zip-deflated wheels.
- wheels.txt: the wheels' names; smoke.sh reuses an install made from the same list.
- cache/corpus/, cache/tokenizer.json: a small built-in corpus (Python standard library source,
  as `parallax prepare-data` writes it) and the byte-level BPE trained on it. The smoke runs name
  both explicitly (data.sources, data.tokenizer): Parallax's own cache of the built-in corpus is
  keyed by the Python minor version, so one built here would not be found on a 3.12 machine.

Downloaded wheels are kept in .gpu/wheels/, so running it again downloads nothing new.

    PYTHONPATH=. .venv/bin/python bench/gpu/prepare.py        (what `make gpu-wheels` runs)
"""
from __future__ import annotations

import importlib.metadata
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOWNLOADS = REPO / ".gpu" / "wheels"
CARRY = REPO / ".gpu" / "carry"
CARRY_LIMIT = 64 * 2**20
CORPUS_BYTES = 2_000_000  # ~500k tokens: far more than the smoke's runs read (12 steps of a few thousand)
VOCAB_SIZE = 8192  # the tiny configs' data.vocab_size

# Distribution -> why the target needs it. Not carried, because the target has them: torch, numpy,
# pyyaml, tokenizers, huggingface-hub, tqdm, packaging, filelock (torch, transformers) and tensorboard.
CARRIED = {
    "deepspeed": "the engine; an sdist on PyPI, built here into a py3-none-any wheel",
    "megatron-core": "the tensor-parallel layers",
    "einops": "DeepSpeed",
    "hjson": "DeepSpeed (its config)",
    "msgpack": "DeepSpeed",
    "py-cpuinfo": "DeepSpeed's CPU accelerator",
    "ninja": "DeepSpeed's CPU accelerator JIT-builds its shared-memory op with it (the CPU runs)",
    "psutil": "Parallax (CPU memory figure) and DeepSpeed",
    "pydantic": "the config schema",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs a newer one than torch's floor",
    "datasets": "the data pipeline's shard readers",
    "fsspec": "datasets, at a version within its cap (torch brings an uncapped one)",
    "dill": "datasets",
    "multiprocess": "datasets",
    "xxhash": "datasets",
    "pyarrow": "datasets and the Parquet reader",
    "pandas": "datasets imports it",
    "python-dateutil": "pandas",
    "tzdata": "python-dateutil",
}
SDIST_ONLY = {"deepspeed"}
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def versions() -> dict[str, str]:
    """Each carried distribution at the version installed here."""
    found, missing = {}, []
    for name in CARRIED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        sys.exit(f"prepare.py: {', '.join(missing)} not installed here; run it with the project's venv (make gpu-wheels)")
    return found


def fetch_wheels(pins: dict[str, str]) -> list[Path]:
    """The pinned wheels, downloaded (or, for an sdist, built) into .gpu/wheels unless already there."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-qq"]
    binary = [f"{name}=={version}" for name, version in pins.items() if name not in SDIST_ONLY]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", *TARGET, "-d", DOWNLOADS, *binary], check=True)
    # No build isolation: building needs only setuptools, which is here.
    built = [f"{name}=={pins[name]}" for name in SDIST_ONLY]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", DOWNLOADS, *built], check=True)
    wanted = {(_normalize(name), _normalize(version)) for name, version in pins.items()}
    wheels = sorted(w for w in DOWNLOADS.glob("*.whl") if tuple(map(_normalize, w.name.split("-")[:2])) in wanted)
    if len(wheels) != len(wanted):
        sys.exit(f"prepare.py: expected {len(wanted)} wheels in {DOWNLOADS}, found {[w.name for w in wheels]}")
    return wheels


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def pack(wheels: list[Path]) -> None:
    """One xz tarball of the wheels, each re-zipped without compression so that xz sees raw bytes.
    A wheel's RECORD hashes its files, not the zip entries, so the re-zipped wheel is the same wheel."""
    listing = "".join(f"{w.name}\n" for w in wheels)
    tarball, names = CARRY / "wheels.tar.xz", CARRY / "wheels.txt"
    if tarball.exists() and names.exists() and names.read_text() == listing:
        return
    CARRY.mkdir(parents=True, exist_ok=True)
    print(f"prepare.py: packing {len(wheels)} wheels into {tarball.relative_to(REPO)} (a minute or two)", flush=True)
    with tarfile.open(tarball, "w:xz", preset=6) as tar:
        for wheel in wheels:
            stored = io.BytesIO()
            with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
                for entry in src.infolist():
                    dst.writestr(entry, src.read(entry), compress_type=zipfile.ZIP_STORED)
            info = tarfile.TarInfo(wheel.name)
            info.size, info.mtime, info.mode = stored.tell(), int(wheel.stat().st_mtime), 0o644
            stored.seek(0)
            tar.addfile(info, stored)
    names.write_text(listing)


def build_cache() -> None:
    from data_pipeline import prepare_data, prepare_tokenizer

    corpus, tokenizer = CARRY / "cache" / "corpus", CARRY / "cache" / "tokenizer.json"
    if not corpus.is_dir():
        prepare_data(corpus, max_bytes=CORPUS_BYTES, num_shards=4)
    if not tokenizer.is_file():
        prepare_tokenizer([corpus], tokenizer, vocab_size=VOCAB_SIZE)


def report(wheels: list[Path]) -> int:
    mib = 2**20
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / mib:6.2f} MiB  {wheel.name}")
    carried = [p for p in CARRY.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in carried)
    cache = sum(p.stat().st_size for p in carried if "cache" in p.relative_to(CARRY).parts)
    print(f"wheels: {len(wheels)} files, {sum(w.stat().st_size for w in wheels) / mib:.1f} MiB as downloaded, "
          f"{(CARRY / 'wheels.tar.xz').stat().st_size / mib:.1f} MiB packed; corpus and tokenizer {cache / mib:.1f} MiB")
    print(f"carry {CARRY.relative_to(REPO)}/: {total / mib:.1f} MiB of {CARRY_LIMIT / mib:.0f} MiB")
    if total > CARRY_LIMIT:
        print("prepare.py: the kit is over the limit a device machine accepts", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    wheels = fetch_wheels(versions())
    pack(wheels)
    build_cache()
    sys.exit(report(wheels))


if __name__ == "__main__":
    main()
