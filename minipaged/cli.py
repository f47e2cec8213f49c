"""The ``minipaged`` command line. Each subcommand lives beside the code it drives; this file only
collects them, so ``minipaged --help`` lists everything the package can show."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# module name -> function(subparsers) that adds that module's subcommand(s)
COMMANDS: list[tuple[str, str]] = [
    ("minipaged.demo", "add_commands"),
    ("minipaged.sim.cli", "add_commands"),
    ("minipaged.lessons", "add_commands"),
    ("minipaged.bench.cli", "add_commands"),
]


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type shared by the subcommands: an int in ``[minimum, maximum]``, else a
    message naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minipaged",
        description="Teaching implementation of paged KV-cache memory management (vLLM style).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module, func in COMMANDS:
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `minipaged simulate | head` closed the pipe early: not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
