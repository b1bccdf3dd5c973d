"""What every stage's command line shares: one log format, and known input errors as one line and exit status 2.

A known error (bad corpus, damaged file, wrong settings) is the user's to fix, so it gets its message, not a
traceback; anything else is a bug and keeps its traceback. SIGTERM (what systemd, Docker, Kubernetes and
`kill` send) stops a command exactly as Ctrl-C does, so what a command started is torn down either way.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ChorusError(ValueError):
    """The base of every error Chorus raises for a problem the user can fix (bad input, a damaged or held file,
    settings that cannot work); the message names it. `exit_on` prints these as one line and exits 2; any
    other exception (a ValueError from a bug included) keeps its traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)


def sigterm_as_ctrl_c() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C (SIGINT) does.

    By default SIGTERM ends Python at once: no `finally`, no context manager's exit, so Ray, Serve replicas
    and engines a command started outlive it. Only the first SIGTERM interrupts; later ones (a supervisor
    repeating itself) are ignored so that the clean-up they would cut short can finish."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; a caller there sets it

    def interrupt(signum, frame):
        # A handler that does nothing, not SIG_IGN: an ignored signal stays ignored in every process started
        # afterwards, a caught one reverts to the default there.
        signal.signal(signal.SIGTERM, lambda *_: None)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    # SIGINT too, explicitly: a process started in the background by a non-interactive shell (a script's `cmd &`,
    # nohup, some supervisors) inherits SIGINT ignored, and Python then leaves it ignored, so `kill -INT` (or a
    # test's Ctrl-C) did nothing to `serve up`. Ctrl-C is this CLI's documented stop: make it one in every case.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def exit_on() -> Iterator[None]:
    """Run the block (SIGTERM in it acts as Ctrl-C); a ChorusError - every error the project raises for input a
    user can fix derives from it - prints `error: <message>` to stderr and exits with status 2. Nothing else is
    caught: a bare ValueError is a bug and keeps its traceback."""
    sigterm_as_ctrl_c()
    try:
        yield
    except ChorusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        # Clean-up (`finally`, context managers) has run by now. Every stage is resumable: say so, and exit
        # as shells expect of an interrupted command (128 + SIGINT), without a traceback.
        print(f"interrupted ({e or 'Ctrl-C'}): what was finished is kept; re-run the same command to resume",
              file=sys.stderr)
        sys.exit(130)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """What every stage's `main` does: parse, set up logging (-v), run the chosen subcommand (`func`) under
    `exit_on`, and return what it returned."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    with exit_on():
        return args.func(args)
