"""The scripts' error convention: a user's mistake is one line on stderr and a non-zero exit, never a traceback;
`--debug` shows the traceback instead.

    p = cli.Parser(description=...)          # argparse, plus --debug; a bad option is one line, exit 2
    args = p.parse_args(argv)
    return cli.run(lambda: body(args), args.debug)

A user's mistake is what a person fixes in the command, the config or the files: ValueError (ConfigError and
every bad-value error of the package), OSError (a missing, unreadable or unwritable file or directory), ImportError
(an optional extra that is not installed). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, OSError, ImportError)


def one_line(err: BaseException) -> str:
    """The error and its notes on one line (an OSError without a message gets its class name)."""
    notes = " ".join(getattr(err, "__notes__", []))
    return " ".join(f"{err or type(err).__name__} {notes}".split())


def run(body: Callable[[], int], debug: bool, errors: tuple = USER_ERRORS) -> int:
    """body()'s exit code, or 1 after one `error: ...` line on stderr for a user's mistake (re-raised with debug)."""
    try:
        return body()
    except errors as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


class Parser(argparse.ArgumentParser):
    """argparse with `--debug`; a bad option prints one line (not the usage block) and exits 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for the usage)\n")
