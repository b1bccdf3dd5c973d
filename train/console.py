"""What every stage's command line shares: one log format, and known input errors as one line and exit status 2.

A known error (bad corpus, damaged file, wrong settings) is the user's to fix, so it gets its message, not a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)


@contextmanager
def exit_on(*known: type[Exception]) -> Iterator[None]:
    """Run the block; a `known` error prints `error: <message>` to stderr and exits with status 2."""
    try:
        yield
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
