"""The one exception type users see from the data pipeline."""


class DataError(Exception):
    """A problem with the user's data or data config.

    The message is a single line that names the file or field at fault and says
    what to do, so the CLI can print it as-is instead of a traceback.
    """
