"""Types for the command line's counting flags (ranks, restarts, shards, steps, seconds).

A count out of range is refused while the arguments are parsed, in argparse's words and with its exit
code 2, before a config is read, a file written or a rank started: past that point it made a
ZeroDivisionError, an assertion deep in torchrun, or a silently different value. Importing nothing,
this module keeps `parallax --help` instant.
"""
import argparse


def positive_int(text: str) -> int:
    """A count of which there must be at least one: ranks, shards, bytes, layouts to print, seconds of warning."""
    return _whole_number_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """A count that may be zero: restarts, a checkpoint's step."""
    return _whole_number_at_least(text, 0)


def _whole_number_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"give a whole number of at least {minimum}; got {text}")
    return value


def segment_counts(text: str) -> list[int]:
    """A comma-separated list of segment counts, e.g. 1,2,4,8."""
    return [_whole_number_at_least(part.strip(), 1) for part in text.split(",")]
