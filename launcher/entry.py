"""The per-rank entry point: `python -m launcher.entry CONFIG [overrides]`.

Whatever starts the ranks sets torch's env:// variables: torchrun locally, or, under srun, this
module from SLURM's own (launcher/slurm/env.py). It reads the config and runs the training loop on this rank.
"""
import logging
import os
import sys
import warnings

from launcher.config import load_config
from launcher.errors import (REQUEUE_EXIT_CODE, SAVE_FAILED_EXIT_CODE, USER_ERROR_EXIT_CODE, USER_ERRORS, SaveFailed,
                             exit_with)
from launcher.slurm.env import SlurmError, set_torch_rendezvous
from launcher.stopping import StopRequested, listen_for_stop_signals
from parallel.checkpoint import CheckpointError


def _quiet_third_party_logs() -> None:
    """Megatron and DeepSpeed announce optional kernels they did not find, and torch 2.13 warns on
    every call DeepSpeed makes to the collective it renamed; none of it is the user's to act on."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated.*", category=FutureWarning)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv=None) -> None:
    listen_for_stop_signals()  # before the seconds to minutes of start-up: imports, model, resume
    argv = sys.argv[1:] if argv is None else argv
    _quiet_third_party_logs()
    try:
        set_torch_rendezvous()
    except SlurmError as e:
        exit_with(e, prefix=f"parallax: error (SLURM task {os.environ.get('SLURM_PROCID')}): ")
    from launcher.train import train

    rank = os.environ.get("RANK", "0")
    try:
        cfg = load_config(argv[0], argv[1:])
        cfg.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            # torchrun restarted the ranks after a crash: the newest checkpoint is at least as new as the one named
            cfg.checkpoint.resume = "auto"
        train(cfg)
    except (CheckpointError, SaveFailed) as e:  # every rank reached the same verdict together: rank 0 says it
        if rank == "0":
            print(f"parallax: error: {e}", file=sys.stderr, flush=True)
        sys.exit(SAVE_FAILED_EXIT_CODE if isinstance(e, SaveFailed) else USER_ERROR_EXIT_CODE)
    except USER_ERRORS as e:
        exit_with(e, prefix=f"parallax: error (rank {rank}): ")
    except StopRequested as e:
        if rank == "0":
            print(f"parallax: {e} (exit code {REQUEUE_EXIT_CODE}: requeue me)", flush=True)
        sys.exit(REQUEUE_EXIT_CODE)


if __name__ == "__main__":
    main()
