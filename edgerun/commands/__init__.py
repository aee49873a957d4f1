"""The subcommands of the `edgerun` CLI, one module each with add_parser(subparsers) and main(args)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_range(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    """An argparse type: an integer from low (up to high, when given); `what` names the unit in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"from {low} to at most {high}{what}, got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse
