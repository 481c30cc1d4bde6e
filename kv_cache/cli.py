"""`kv-cache`: the command line — demo, generate, eval, inspect, bench.

    kv-cache demo                         # full vs compressed cache on the shipped model, side by side
    kv-cache generate "def fib(n):" --bits 4 --max-new-tokens 64
    kv-cache eval --quick --plot out.png  # the fidelity table (perplexity, agreement, needles, bytes/token)
    kv-cache inspect --layers 16 --kv-heads 8 --head-dim 128 --budget-mb 1024
    kv-cache bench --quick --out bench_results/   # the CPU benchmarks: results.json, tables, PNG plots

Every command takes `--json` for scripts. Exit codes: 0 success, 2 bad usage, 3 invalid configuration or input
(`CacheValidationError`), 4 out of cache memory (`CacheMemoryError`), 5 device unavailable (`CacheDeviceError`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kv_cache.errors import CacheDeviceError, CacheMemoryError, CacheValidationError

EXIT_CODES: list[tuple[type[Exception], int]] = [
    (argparse.ArgumentTypeError, 2),  # an option value found bad once the command looked at it
    (CacheValidationError, 3),
    (CacheMemoryError, 4),
    (CacheDeviceError, 5),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the weights load in well under a second
    command: Callable[[argparse.Namespace], dict[str, Any]] = args.command
    try:
        result = command(args)
    except Exception as error:  # a documented exit code per error kind; anything else is a bug (code 1)
        for kind, code in EXIT_CODES:
            if isinstance(error, kind):
                print(f"error: {error}", file=sys.stderr)
                return code
        raise
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kv_cache import cli_bench, cli_commands

    parser = argparse.ArgumentParser(prog="kv-cache", description=__doc__.splitlines()[0])
    parser.set_defaults(json=False)
    commands = parser.add_subparsers(required=True, metavar="command")
    for name, (handler, add_arguments, help_text) in {**cli_commands.COMMANDS, "bench": cli_bench.COMMAND}.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
        add_arguments(sub)
        sub.set_defaults(command=handler)
    return parser


if __name__ == "__main__":
    sys.exit(main())
