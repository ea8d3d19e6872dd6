"""The per-rank entry point: `python -m launcher.entry [--evaluate OUT_JSON] CONFIG [overrides]`.

Whatever starts the ranks sets torch's env:// variables: torchrun locally, or, under srun, this
module from SLURM's own (launcher/slurm/env.py). It reads the config and runs the training loop on
this rank, or with --evaluate (`parallax eval`) evaluates the checkpoint checkpoint.resume names.
"""
import os
import signal
import sys
from functools import partial
from pathlib import Path

from launcher.config import load_config
from launcher.console import failed_after_a_peer, quiet_third_party, report_error_once
from launcher.errors import (DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE, SAVE_FAILED_EXIT_CODE, USER_ERROR_EXIT_CODE,
                             USER_ERRORS, SaveFailed, TrainingDiverged, exit_with)
from launcher.slurm.env import SlurmError, set_torch_rendezvous
from launcher.stopping import StopRequested, listen_for_stop_signals
from parallel.checkpoint import CheckpointError


def main(argv=None) -> None:
    listen_for_stop_signals()  # before the seconds to minutes of start-up: imports, model, resume
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party()
    try:
        set_torch_rendezvous()
    except SlurmError as e:
        exit_with(e, prefix=f"parallax: error (SLURM task {os.environ.get('SLURM_PROCID')}): ")
    from launcher.evaluate import evaluate_checkpoint
    from launcher.train import train

    job = train
    if argv[:1] == ["--evaluate"]:
        job, argv = partial(evaluate_checkpoint, out=Path(argv[1])), argv[2:]
    rank = os.environ.get("RANK", "0")
    try:
        cfg = load_config(argv[0], argv[1:])
        cfg.check_world_size(int(os.environ.get("WORLD_SIZE", "1")))
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            # torchrun restarted the ranks after a crash: the newest checkpoint is at least as new as the one named
            cfg.checkpoint.resume = "auto"
            if job is train and (Path(cfg.logging.run_dir) / TrainingDiverged.MARKER).exists():
                sys.exit(DIVERGED_EXIT_CODE)  # the round that diverged said why; these steps would diverge again
        job(cfg)
    except (CheckpointError, SaveFailed, TrainingDiverged) as e:  # every rank's verdict alike: rank 0 says it
        if rank == "0":
            print(f"parallax: error: {e}", file=sys.stderr, flush=True)
        codes = {SaveFailed: SAVE_FAILED_EXIT_CODE, TrainingDiverged: DIVERGED_EXIT_CODE}
        sys.exit(codes.get(type(e), USER_ERROR_EXIT_CODE))
    except USER_ERRORS as e:  # one rank's problem, or every rank's (a file they all read): said once
        report_error_once(f"parallax: error (rank {rank}): {e}", e)
        sys.exit(USER_ERROR_EXIT_CODE)
    except StopRequested as e:
        # Saved: leave with "requeue me" even when SIGTERM comes now. srun --kill-on-bad-exit sends it to
        # the ranks still exiting once one has exited 75, and Python's own handler is gone while the
        # interpreter shuts down: a rank it killed would turn the job's 75 into 143, which is not requeued.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rank == "0":
            print(f"parallax: {e} (exit code {REQUEUE_EXIT_CODE}: requeue me)", flush=True)
        sys.exit(REQUEUE_EXIT_CODE)
    except Exception:
        if failed_after_a_peer():  # which said why; this rank's traceback would only say it lost that peer
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
