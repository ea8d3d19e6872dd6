"""How a run ends when it does not finish: one line on stderr, a documented exit code, no traceback."""
import sys

from data_pipeline import DataError
from launcher.config import ConfigError
from models.huggingface import HuggingFaceError
from parallel.checkpoint import CheckpointError
from parallel.topology import TopologyError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TopologyError, HuggingFaceError)
USER_ERROR_EXIT_CODE = 2
SAVE_FAILED_EXIT_CODE = 74  # sysexits EX_IOERR: the last checkpoint could not be written; fix the disk
REQUEUE_EXIT_CODE = 75  # sysexits EX_TEMPFAIL: stopped early with a checkpoint; run the same command again
DIVERGED_EXIT_CODE = 3  # train.max_bad_steps non-finite steps in a row: the same command would meet them again
HANG_EXIT_CODE = 76  # no progress for train.hang_seconds: stacks in RUN_DIR/hang/; restart as any failure


class SaveFailed(Exception):
    """The last save that had to succeed (at the end of the run, or before stopping) did not."""


class TrainingDiverged(Exception):
    """train.max_bad_steps steps in a row had a non-finite loss or gradient norm, on every rank alike. Rank 0
    leaves the line in RUN_DIR/diverged.txt, so that an automatic restart (--max-restarts, which would resume
    from the last checkpoint and meet the same steps) stops at once instead of training up to them again."""

    MARKER = "diverged.txt"


def exit_with(error: Exception, prefix: str = "parallax: error: ", code: int = USER_ERROR_EXIT_CODE) -> None:
    print(f"{prefix}{error}", file=sys.stderr, flush=True)
    sys.exit(code)
