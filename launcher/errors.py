"""How a user error ends a process: one line on stderr, exit code 2, no traceback."""
import sys

from data_pipeline import DataError
from launcher.config import ConfigError

USER_ERRORS = (ConfigError, DataError)
USER_ERROR_EXIT_CODE = 2


def exit_with(error: Exception, prefix: str = "parallax: error: ") -> None:
    print(f"{prefix}{error}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT_CODE)
