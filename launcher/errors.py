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


class SaveFailed(Exception):
    """The last save that had to succeed (at the end of the run, or before stopping) did not."""


def exit_with(error: Exception, prefix: str = "parallax: error: ", code: int = USER_ERROR_EXIT_CODE) -> None:
    print(f"{prefix}{error}", file=sys.stderr, flush=True)
    sys.exit(code)
