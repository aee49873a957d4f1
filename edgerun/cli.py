"""`edgerun` command line: a thin dispatcher; each subcommand lives in edgerun/commands/<name>.py."""

from __future__ import annotations

import argparse
import sys

from .errors import EdgerunError

COMMANDS = ("run", "demo", "chat", "serve", "convert", "bench", "calibrate", "trace", "profile", "plan")


class _Parser(argparse.ArgumentParser):
    """Bad arguments end in one line and exit code 2, not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = _Parser(prog="edgerun", description="Run huge Mixture-of-Experts language models on consumer hardware.")
    parser.add_argument("--version", action="version", version=f"edgerun {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        import_module(f"edgerun.commands.{name}").add_parser(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument already reported
        return int(e.code or 0)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.main(args) or 0)
    except EdgerunError as e:
        print(f"edgerun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nedgerun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. head)
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
