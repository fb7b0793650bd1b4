"""Command line: `nucleibatch segment | train | evaluate | export | report | verify` (thin: parses, then calls the library).

Each command has a module here that adds its subparser and runs it (``add_parser``, ``run``,
bound to the parsed arguments by ``set_defaults(func=run)``). This module holds what they
share: the parser class, :func:`build_parser`, and :func:`main`, which sets up the allocator,
logging and SIGTERM, runs the command and turns errors into exit statuses.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

from .. import __version__
from ..errors import NucleibatchError
from ..runtime.allocator import tune_allocator
from . import evaluate, export, report, segment, train, verify

COMMANDS = (segment, train, evaluate, export, report, verify)
"""The command modules, in the order `nucleibatch --help` lists them."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `nucleibatch` parser: global options and every command's subparser; the parsed
    arguments carry ``command`` (its name) and ``func`` (its ``run``)."""
    parser = _Parser(prog="nucleibatch", description="Nuclei segmentation of microscopy archives.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"nucleibatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


# after SIGTERM, how long the command may take to stop cleanly (images in flight are then left to
# the next run, which redoes them)
STOP_GRACE_S = 30.0


class Terminated(KeyboardInterrupt):
    """SIGTERM (how SLURM, Kubernetes and systemd stop a job): stops the command as Ctrl-C does."""


@contextlib.contextmanager
def stop_on_sigterm(command: str) -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` in the main thread; if the
    command has not stopped :data:`STOP_GRACE_S` later (or a second SIGTERM comes), the process
    exits with status 1 at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    timers: list[threading.Timer] = []

    def exit_now(reason: str) -> None:
        try:  # os.write: no buffered stream that a closed stderr or a reentrant print could break
            os.write(2, f"nucleibatch {command}: stopped: {reason}; finished work is kept, re-run the same command to resume\n".encode())
        finally:
            os._exit(1)

    def on_sigterm(signum, frame) -> None:
        if timers:
            exit_now("a second SIGTERM")
        timer = threading.Timer(STOP_GRACE_S, exit_now, args=(f"SIGTERM, and images still in flight after {STOP_GRACE_S:.0f} s",))
        timer.daemon = True
        timers.append(timer)
        timer.start()
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        for timer in timers:  # stopped in time: no exit later
            timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nucleibatch` console script; returns the exit status."""
    tune_allocator()  # before any thread starts: see nucleibatch/runtime/allocator.py
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_on_sigterm(args.command):
            return args.func(args)
    except NucleibatchError as error:
        print(f"nucleibatch {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError as error:
        if not stdout_reader_gone():
            return _stopped(args.command, error)
        # the reader of our output left (`nucleibatch verify OUT | head -1`): quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except OSError as error:  # disk full, output not writable, ...: the run stops, what is done stays
        return _stopped(args.command, error)
    except KeyboardInterrupt as stop:
        cause = "SIGTERM" if isinstance(stop, Terminated) else "interrupted (Ctrl-C)"
        print(f"nucleibatch {args.command}: stopped: {cause} (finished work is kept; re-run the same command to resume)", file=sys.stderr)
        return 1


def _stopped(command: str, error: OSError) -> int:
    print(f"nucleibatch {command}: stopped: {error} (finished work is kept; fix the cause and re-run to resume)", file=sys.stderr)
    return 1


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False
