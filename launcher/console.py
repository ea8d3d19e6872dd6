"""What a run prints: Parallax's own lines, each once (issue 14 point 9).

Third-party noise. Libraries print things a Parallax user cannot act on; `quiet_third_party` keeps
exactly these out, matched by their text (and by the module that warns where that is the library's),
and lets everything else through:
- torch 2.13 deprecates the collective names DeepSpeed's ZeRO (and parallel/sequence_parallel.py)
  call every step, `reduce_scatter_tensor` and `all_gather_into_tensor`: a two-line FutureWarning
  per call on every rank, most of what a short ZeRO-3 run printed;
- megatron-core announces at import that Transformer Engine and Apex are absent and it falls back to
  its own kernels, which Parallax does not use (DeepSpeed owns the optimizer);
- DeepSpeed warns that it chose its CPU accelerator when DS_ACCELERATOR is unset, as only a plan
  (`parallax plan`, or `submit` planning a GPU job) leaves it, building its model on the meta device;
- transformers draws progress bars while it writes and reads a model directory (`parallax export`,
  `generate`, `model.init_from`), on stderr, which is for errors.
They are dropped, not logged to a file: each is fully known and listed here, and none says anything
about the run.

Errors once. Every rank of a launch that meets the same bad input (a data file every rank reads)
raises the same error; `report_error_once` prints it on the first rank only, and a problem one rank
alone meets is still printed by that rank. When a rank fails, its peers' collectives fail next
("connection closed by peer"); `failed_after_a_peer` tells a rank that its failure is such a
consequence, so it exits without a traceback that would bury the one line that says why. Both ask
the key-value store every rank joined through (torch's rendezvous TCPStore): its `add` is atomic, so
exactly one rank is first, with no collective (which a failing job could not complete) and no file.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from datetime import timedelta

FAILED_KEY = "parallax/failed"  # ranks of this launch that have failed so far
STORE_TIMEOUT = timedelta(seconds=10)  # a store that does not answer this fast belongs to a dead or cut-off rank 0


def quiet_third_party() -> None:
    """Keep the third-party lines listed in this module's docstring off the console. Cheap: no imports."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                            "is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                            module=r"megatron\.")
    logging.getLogger("DeepSpeed").addFilter(_not_the_accelerator_guess)  # once, however often this is called
    # transformers asks huggingface_hub when it is imported (later, and only by the commands that use it);
    # huggingface_hub reads the variable when it is imported, which `datasets` may already have done.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()


def _not_the_accelerator_guess(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU.")


def report_error_once(line: str, error: Exception) -> None:
    """Print `line` on stderr unless another rank of this launch has already reported the same error.

    A rank that has not joined its peers yet, or whose rank 0 (the store's host) has already exited,
    cannot tell and prints: an error said twice beats an error never said.
    """
    try:
        _add_one(FAILED_KEY)
        first = _add_one("parallax/error/" + hashlib.sha256(str(error).encode()).hexdigest()) == 1
    except (LookupError, RuntimeError):
        first = True
    if first:
        print(line, file=sys.stderr, flush=True)


def failed_after_a_peer() -> bool:
    """Whether another rank of this launch failed before this one, counting this rank's failure.

    Then this rank's error is the consequence (its peers stopped answering) and the first rank has
    said why. A rank that has not joined its peers cannot have lost one. A store that does not answer
    means its host, rank 0, has exited (or is cut off): it failed first, and said why or the launcher
    reports its exit code.
    """
    try:
        return _add_one(FAILED_KEY) > 1
    except LookupError:
        return False
    except RuntimeError:
        return True


def _add_one(key: str) -> int:
    """Add 1 to `key` in the store every rank of this launch joined through and return the new value.

    LookupError: this rank has not joined a process group. RuntimeError (torch's DistError): the
    store does not answer; torch's C++ side also logs that failure, with a stack, straight to file
    descriptor 2, which is silenced for the call since the caller handles it.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise LookupError("no process group")
    store = dist.distributed_c10d._get_default_store()  # what init_process_group joined through
    store.set_timeout(STORE_TIMEOUT)
    with _file_descriptor_2_silenced():
        return store.add(key, 1)


@contextlib.contextmanager
def _file_descriptor_2_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
