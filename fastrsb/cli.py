"""`fastrsb` console script: git-style subcommands, each owned by the module that implements it."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers) and keeps heavy imports inside its handlers,
# so `fastrsb --help` is instant.
COMMAND_MODULES = [
    "dataprep.cli",
    "fastrsb.run_cli",
    "fastrsb.bench.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrsb", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
