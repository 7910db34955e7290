"""The `engram` command line: one entry point, one subcommand per job (`engram COMMAND --help`).

Every command is a module of this package with ``add_parser(subparsers)``, which adds its parser and returns it,
and ``run(args) -> int``, which does the job and returns the exit code; :data:`COMMANDS` lists them. Bad input
raises ``ValueError`` (or ``FileNotFoundError``, ``FileExistsError``; ``ConnectionError`` for a service that does not
answer) naming the bad value: :func:`main` prints it and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from engram import __version__
from engram.cli import (data, demo, evaluate, generate, inspection, memory, retrofit, serve, store, sweep, train,
                        tune)

COMMANDS = (demo, data, train, sweep, evaluate, generate, tune, retrofit, memory, serve, store, inspection)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Conditional memory for language models.")
    parser.add_argument("--version", action="version", version=f"engram {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers).set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError) as err:
        print(f"engram {args.command}: error: {err}", file=sys.stderr)
        return 2
